"""Placement: which role runs in which placement group and bundle, with how many CPU/GPU.

`plan_resources(cfg)` turns the config into a `ResourcePlan` (pure, no Ray); `preflight`
compares it with the cluster and fails in seconds with "needed vs available";
`create_placement_groups` creates every group up front and waits with a timeout. Actors
are then started with `ray.remote(Cls).options(scheduling_strategy=pgs.strategy(role, i),
**pgs.resources(role))`.

Roles and what each actor asks for (one actor per engine / rank / model):

    rollout    rollout.engines engines, each rollout.tensor_parallel_size GPUs (one bundle;
               vLLM runs its TP workers inside the actor, on the GPUs Ray gave it)
    policy     policy.num_ranks ranks, 1 GPU each
    critic     critic.num_ranks ranks, 1 GPU each; only with ppo.advantage=gae
    reference  reference.num_ranks ranks, 1 GPU each (whole-model replicas, or ZeRO-3
               partitions with reference.zero_stage=3); none with reference.colocate
               (the default on CPU runs: each policy rank holds the reference too)
    reward     1 actor, 1 GPU; only when model.reward is set (rule-based rewards are
               scored in the driver, on CPU, and need no placement)

Every actor also asks for 1 logical CPU. Three layouts:

- CPU run (placement.gpus_per_node == 0): one {"CPU": 1} bundle per actor in one PACK
  group; placement.mode does not matter.
- disaggregated: every actor gets its own bundle of whole GPUs; no two roles share a GPU.
- colocated (the hybrid-engine layout): G = max(policy ranks, engines, critic ranks) bundles
  of {"GPU": 1}; policy rank i, engine i, critic rank i and reference rank i share bundle
  i, the reward model sits on bundle 1 (mod G); G counts reference ranks too. Each actor asks for the same
  fraction 1/k of its GPU, k = the number of GPU roles in the run: 1/4 = 0.25 for
  policy+rollout+reference+critic, 0.2 with a reward model too, 0.3333 without critic.
  The fraction is a scheduling token that keeps the k roles on one GPU, not a memory cap:
  memory is shared in time (vLLM sleep/wake, DeepSpeed offload). Engines must have
  tensor_parallel_size 1 here (a fractional GPU request cannot span GPUs).

Bundles and nodes: GPU bundles are cut into groups of at most placement.gpus_per_node GPUs,
each created with STRICT_PACK, so a group is exactly one node's worth (or less) and always
lands on one node. We chose this over one big PACK group because PACK is best effort: Ray
may spread a role's ranks over more nodes than needed, and the plan could not say which
actors share a node (NCCL within a node, CUDA-IPC weight sync in colocated mode need to
know). The price: each group needs one node with that many GPUs free at once; `preflight`
checks every group fits the largest node, and groups of different roles may share a node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput

ROLE_ORDER = ("rollout", "policy", "critic", "reference", "reward")


@dataclass(frozen=True)
class Slot:
    """Where one actor is scheduled."""

    group: int   # index into ResourcePlan.groups
    bundle: int  # bundle index inside that group


@dataclass(frozen=True)
class RoleSpec:
    """One role: how many actors, what each asks for, and where each one goes."""

    name: str               # one of ROLE_ORDER
    count: int              # actors of this role (engines, ranks, or 1)
    num_cpus: float         # logical CPUs per actor
    num_gpus: float         # GPUs per actor: whole in disaggregated, a fraction in colocated
    slots: tuple[Slot, ...]  # [count]: slot of actor i

    def label(self) -> str:
        """E.g. "rollout(4x2)", "policy(4)", "critic(2x0.25)"."""
        per = self.num_gpus if self.num_gpus else self.num_cpus
        return f"{self.name}({self.count})" if per == 1 else f"{self.name}({self.count}x{per:g})"


@dataclass(frozen=True)
class GroupSpec:
    """One placement group to create."""

    name: str                               # e.g. "rollout/0", "shared/1", "cpu/0"
    strategy: str                           # "STRICT_PACK" (GPU runs) or "PACK" (CPU runs)
    bundles: tuple[dict[str, float], ...]   # [n_bundles]: {"CPU": c, "GPU": g}

    def total(self, resource: str) -> float:
        return sum(b.get(resource, 0) for b in self.bundles)


@dataclass(frozen=True)
class ResourcePlan:
    """The whole placement, computed from the config before Ray starts anything."""

    mode: str                 # "cpu", "disaggregated" or "colocated"
    gpus_per_node: int        # placement.gpus_per_node (0 = CPU run)
    roles: tuple[RoleSpec, ...]   # in ROLE_ORDER, only the roles this run has
    groups: tuple[GroupSpec, ...]

    def role(self, name: str) -> RoleSpec:
        for spec in self.roles:
            if spec.name == name:
                return spec
        raise KeyError(f"role {name!r} is not in this plan (roles: {', '.join(self.role_names)})")

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.roles)

    def total(self, resource: str) -> float:
        """Total "CPU" or "GPU" reserved by all groups."""
        return _round(sum(g.total(resource) for g in self.groups))

    def breakdown(self) -> str:
        """E.g. "rollout(4x2) + policy(4)"; colocated plans say so."""
        text = " + ".join(spec.label() for spec in self.roles)
        return f"colocated {text} on {self.total('GPU'):g} shared GPU" if self.mode == "colocated" else text

    def describe(self) -> str:
        """Human-readable: each group, each bundle, who runs there with how many CPU/GPU."""
        who: dict[tuple[int, int], list[str]] = {}
        for spec in self.roles:
            for i, slot in enumerate(spec.slots):
                who.setdefault((slot.group, slot.bundle), []).append(
                    f"{spec.name}[{i}] ({spec.num_cpus:g} CPU, {spec.num_gpus:g} GPU)")
        node = f"{self.gpus_per_node} GPU per node" if self.gpus_per_node else "CPU only"
        lines = [f"placement plan: {self.mode}, {node}; needs {self.total('GPU'):g} GPU, "
                 f"{self.total('CPU'):g} CPU in {len(self.groups)} placement group(s)"]
        for gi, group in enumerate(self.groups):
            lines.append(f"  group {gi} {group.name} ({group.strategy}): {len(group.bundles)} bundle(s), "
                         f"{group.total('GPU'):g} GPU, {group.total('CPU'):g} CPU")
            for bi, bundle in enumerate(group.bundles):
                res = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
                lines.append(f"    bundle {bi} {{{res}}}: {', '.join(who.get((gi, bi), ['(empty)']))}")
        return "\n".join(lines)


def _round(x: float) -> float:
    return round(x, 4)  # Ray keeps resource quantities to 4 decimal places


# --------------------------------------------------------------------------- planning


def reference_in_policy(cfg: ExperimentConfig) -> bool:
    """reference.colocate: whether each policy rank's process also holds the frozen reference.

    auto: on CPU runs, where the reference would otherwise be one more process competing for
    the same few cores, and only when it can mirror the policy ranks (as many ranks, whole
    model each: zero_stage 0). The config check rejects `true` where it cannot."""
    ref = cfg.reference
    if ref.colocate == "auto":
        return cfg.placement.gpus_per_node == 0 and ref.zero_stage == 0 and ref.num_ranks == cfg.policy.num_ranks
    return bool(ref.colocate)


def reward_in_driver(cfg: ExperimentConfig) -> bool:
    """reward.scorer: whether the driver scores the replies itself. Reward functions are cheap
    Python over decoded text, and the driver runs them while the learners' forwards run, so
    auto gives them no actor: one process fewer to start, one call fewer a step. A reward
    model or rule model always gets an actor; `actor` forces one (Ray restarts a dead one)."""
    return cfg.reward.scorer == "auto" and not (cfg.model.reward or cfg.model.rule_reward)


@dataclass(frozen=True)
class Threads:
    """torch intra-op threads per role and phase (CPU runs; on GPUs the device computes)."""

    rollout: int = 1
    train: int = 1     # policy and critic ranks during the PPO update
    forward: int = 1   # learners, reference and reward model during the experience phase


def plan_threads(cfg: ExperimentConfig, cores: int) -> Threads:
    """Phases run one after another, so each phase's actors share the machine's `cores`.

    generate: the engines (with rollout.overlap, beside the training ranks); train: policy and
    critic ranks; experience: the reference, the policy (old log-probs) and critic (values) and
    a reward model, one process each (a colocated reference shares the policy's). An actor
    that computes alone gets every core; placement.cpu_threads fixes the count instead."""
    if cfg.placement.gpus_per_node:
        return Threads()
    if cfg.placement.cpu_threads:
        n = cfg.placement.cpu_threads
        return Threads(n, n, n)
    critic = cfg.critic.num_ranks if cfg.ppo.advantage == "gae" else 0
    policy, engines = cfg.policy.num_ranks, cfg.rollout.engines
    overlap = cfg.rollout.overlap
    trainers = policy + critic + (engines if overlap else 0)
    in_policy = reference_in_policy(cfg)
    forwarders = (critic + (1 if cfg.model.reward or cfg.model.rule_reward else 0)
                  + (0 if in_policy else cfg.reference.num_ranks)
                  + (policy if in_policy or cfg.ppo.old_logprobs == "learner" else 0))
    share = lambda k: max(1, cores // max(k, 1))  # noqa: E731
    return Threads(rollout=share(trainers if overlap else engines), train=share(trainers),
                   forward=share(forwarders))


def _actor_counts(cfg: ExperimentConfig) -> dict[str, int]:
    """Actors per role, in ROLE_ORDER, for the roles this run has (a reference inside the
    policy ranks has no actors of its own)."""
    counts = {"rollout": cfg.rollout.engines, "policy": cfg.policy.num_ranks}
    if cfg.ppo.advantage == "gae":
        counts["critic"] = cfg.critic.num_ranks
    if not reference_in_policy(cfg):
        counts["reference"] = cfg.reference.num_ranks
    if cfg.model.reward is not None:
        counts["reward"] = 1
    return counts


def plan_resources(cfg: ExperimentConfig) -> ResourcePlan:
    """The placement plan for an experiment; raises BadInput for layouts that cannot work."""
    counts = _actor_counts(cfg)
    gpn = cfg.placement.gpus_per_node
    if gpn == 0:
        return _plan_cpu(counts)
    tp = cfg.rollout.tensor_parallel_size
    if tp > gpn:
        raise BadInput(f"placement: an engine's {tp} GPUs (rollout.tensor_parallel_size) must be on one node, "
                       f"but placement.gpus_per_node is {gpn}")
    if cfg.placement.mode == "colocated":
        if tp != 1:
            raise BadInput(f"placement: colocated mode shares each GPU between one engine and one policy rank, "
                           f"so rollout.tensor_parallel_size must be 1 (got {tp}); "
                           f"use placement.mode=disaggregated for tensor-parallel engines")
        return _plan_colocated(counts, gpn)
    return _plan_disaggregated(counts, {"rollout": tp}, gpn)


def _plan_cpu(counts: dict[str, int]) -> ResourcePlan:
    # One PACK group: on one machine every bundle lands there; on a CPU cluster Ray may spread.
    roles, bundles = [], []
    for name, n in counts.items():
        roles.append(RoleSpec(name, n, 1.0, 0.0, tuple(Slot(0, len(bundles) + i) for i in range(n))))
        bundles += [{"CPU": 1.0} for _ in range(n)]
    return ResourcePlan("cpu", 0, tuple(roles), (GroupSpec("cpu/0", "PACK", tuple(bundles)),))


def _plan_disaggregated(counts: dict[str, int], gpus_each: dict[str, int], gpn: int) -> ResourcePlan:
    # Per role, actors are packed in order into STRICT_PACK groups of at most gpn GPUs.
    roles, groups = [], []
    for name, n in counts.items():
        g = gpus_each.get(name, 1)
        per_group = gpn // g
        slots = []
        for first in range(0, n, per_group):
            size = min(per_group, n - first)
            slots += [Slot(len(groups), b) for b in range(size)]
            bundle = {"CPU": 1.0, "GPU": float(g)}
            groups.append(GroupSpec(f"{name}/{first // per_group}", "STRICT_PACK",
                                    tuple(dict(bundle) for _ in range(size))))
        roles.append(RoleSpec(name, n, 1.0, float(g), tuple(slots)))
    return ResourcePlan("disaggregated", gpn, tuple(roles), tuple(groups))


def _plan_colocated(counts: dict[str, int], gpn: int) -> ResourcePlan:
    # G one-GPU bundles, cut into node-sized groups; actor i of a multi-actor role on bundle i,
    # the reward model on bundle 1, so bundle 0 (reference rank 0) is not the only crowded one.
    n_bundles = max(n for name, n in counts.items() if name != "reward")
    fraction = math.floor(10000 / len(counts)) / 10000  # 1/k, rounded down to Ray's precision
    first_bundle = {"reward": 1 % n_bundles}

    def slot(global_bundle: int) -> Slot:
        return Slot(global_bundle // gpn, global_bundle % gpn)

    roles, cpus = [], [0.0] * n_bundles
    for name, n in counts.items():
        where = [first_bundle[name]] if name in first_bundle else list(range(n))
        for b in where:
            cpus[b] += 1.0
        roles.append(RoleSpec(name, n, 1.0, fraction, tuple(slot(b) for b in where)))
    groups = tuple(
        GroupSpec(f"shared/{start // gpn}", "STRICT_PACK",
                  tuple({"CPU": cpus[b], "GPU": 1.0} for b in range(start, min(start + gpn, n_bundles))))
        for start in range(0, n_bundles, gpn))
    return ResourcePlan("colocated", gpn, tuple(roles), groups)


# --------------------------------------------------------------------------- pre-flight


def cluster_resources() -> dict:
    """Totals and per-node resources of the connected Ray cluster (alive nodes only)."""
    import ray

    total = ray.cluster_resources()
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0), "nodes": nodes}


def preflight(plan: ResourcePlan, resources: dict | None = None) -> None:
    """Raises BadInput if the cluster can never hold the plan; takes no time and creates nothing.

    `resources` is {"CPU": total, "GPU": total, "nodes": [{"CPU": .., "GPU": ..}, ...]} (nodes
    optional); None reads the connected Ray cluster. Checks totals, then that every STRICT_PACK
    group fits on one node and every PACK bundle fits on some node. Enough total resources on a
    badly fragmented cluster can still time out in `create_placement_groups`.
    """
    resources = cluster_resources() if resources is None else resources
    nodes = resources.get("nodes")
    on_nodes = f" ({len(nodes)} node{'s' if len(nodes) != 1 else ''})" if nodes is not None else ""
    for res in ("GPU", "CPU"):
        need, have = plan.total(res), _round(resources.get(res, 0.0))
        if need > have:
            raise BadInput(f"placement: needs {need:g} {res} for {plan.breakdown()}, "
                           f"cluster has {have:g} {res}{on_nodes}")
    if not nodes:
        return
    for group in plan.groups:
        asks = [{r: group.total(r) for r in ("CPU", "GPU")}] if group.strategy == "STRICT_PACK" else group.bundles
        for ask in asks:
            if not any(all(node.get(r, 0.0) >= v for r, v in ask.items()) for node in nodes):
                most = max(node.get("GPU", 0.0) for node in nodes)
                what = "on one node (STRICT_PACK)" if group.strategy == "STRICT_PACK" else "in one bundle"
                raise BadInput(f"placement: group {group.name} needs {ask.get('GPU', 0):g} GPU and "
                               f"{ask.get('CPU', 0):g} CPU {what}, but no node has that much "
                               f"(largest node: {most:g} GPU); set placement.gpus_per_node to the "
                               f"GPUs per node of this cluster")


# --------------------------------------------------------------------------- creation


class PlacementGroups:
    """The created groups of a plan; hands out scheduling options per role and actor."""

    def __init__(self, plan: ResourcePlan, groups: list) -> None:
        self.plan, self.groups = plan, groups

    def strategy(self, role: str, index: int):
        """Scheduling strategy for actor `index` of `role` (its group and bundle index)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.plan.role(role)
        if not 0 <= index < spec.count:
            raise IndexError(f"{role} has {spec.count} actor(s); no actor {index}")
        slot = spec.slots[index]
        return PlacementGroupSchedulingStrategy(placement_group=self.groups[slot.group],
                                                placement_group_bundle_index=slot.bundle)

    def resources(self, role: str) -> dict:
        """`num_cpus`/`num_gpus` for `.options(...)` of every actor of `role`."""
        spec = self.plan.role(role)
        return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}

    def remove(self) -> None:
        """Removes every group (their actors die with them)."""
        from ray.util import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self.groups = []


def create_placement_groups(plan: ResourcePlan, timeout_s: float) -> PlacementGroups:
    """Pre-flights, creates every group of `plan` at once and waits for all of them.

    After `timeout_s` without all groups ready, removes them and raises BadInput naming
    what the plan needs and what the cluster had free (another job may hold GPUs, or the
    nodes are too fragmented for the STRICT_PACK groups).
    """
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util import placement_group

    preflight(plan)
    # What was free when we asked: read after removal it would still count our own groups.
    free, total = ray.available_resources(), ray.cluster_resources()
    groups = PlacementGroups(plan, [placement_group(list(g.bundles), strategy=g.strategy) for g in plan.groups])
    try:
        ray.get([pg.ready() for pg in groups.groups], timeout=timeout_s)
    except GetTimeoutError:
        groups.remove()
        have = " and ".join(f"{_round(free.get(r, 0.0)):g} of {_round(total.get(r, 0.0)):g} {r}"
                            for r in ("GPU", "CPU"))
        per_node = f", each group on one node of {plan.gpus_per_node} GPU" if plan.gpus_per_node else ""
        raise BadInput(
            f"placement: placement groups not ready after {timeout_s:g}s (placement.timeout_s): "
            f"needs {plan.total('GPU'):g} GPU, {plan.total('CPU'):g} CPU for {plan.breakdown()} "
            f"in {len(plan.groups)} group(s){per_node}; cluster had {have} free when they were requested") from None
    return groups
