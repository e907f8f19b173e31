"""`rlhf plan`: where every role of a run goes on a cluster, and whether its memory fits.

    rlhf plan CONFIG [dotted.key=value ...] [--cluster FILE] [--node-type NAME]

Nothing starts and nothing is downloaded: the placement plan is the one `rlhf ppo` uses at
launch (orchestrator/ppo/placement.py), laid out on the nodes of a cluster description
(orchestrator/cluster/cluster_spec.py: Ray's cluster YAML, a simple node list, or this machine)
the way Ray would place STRICT_PACK groups (first fit, largest group first). Memory per
actor comes from the model shapes (orchestrator/cluster/model_catalog.py: local folder, tiny spec
or built-in catalogue) by the rules in orchestrator/cluster/plan_memory.py. Colocated roles are
counted as resident on their GPU at the same time (no sleep/wake swapping is assumed).

Prints the cluster, the placement groups, each node's GPUs with the actors and GiB on
them, and a memory table per role. Exit 0 when everything fits; exit 2 with one line on
stderr naming the first role that does not fit, with needed vs available GiB.

On one CPU machine: `rlhf plan configs/ppo-tiny.yaml` (plans against this machine).
For a cluster: `rlhf plan configs/llama3.1-70b-ppo-4node.yaml --cluster deploy/azure/cluster.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from rlhf.orchestrator.cluster.cluster_spec import GIB, Cluster, Node, load_cluster
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.cluster.model_catalog import ModelShape, resolve_shape
from rlhf.orchestrator.ppo.placement import ResourcePlan, plan_resources, reference_in_policy
from rlhf.orchestrator.cluster import plan_memory as pm


@dataclass(frozen=True)
class Shapes:
    policy: ModelShape
    critic: ModelShape | None   # None without a critic (ppo.advantage != gae)
    reward: ModelShape | None   # None without a reward model


@dataclass
class Layout:
    """Where each placement-group bundle landed: [group][bundle] -> (node index, GPU ids)."""

    bundles: list[list[tuple[int, tuple[int, ...]]]]


@dataclass
class ClusterPlan:
    cfg: ExperimentConfig
    cluster: Cluster
    resources: ResourcePlan
    shapes: Shapes
    memory: dict[str, pm.Memory]                 # role -> per-actor estimate
    layout: Layout | None                        # None when the groups cannot be placed
    loads: dict[tuple[int, int], list[tuple[str, float]]]  # (node, gpu) -> [(actor, bytes held)]
    problems: list[str]                          # one line each; the first is the error
    warnings: list[str] = field(default_factory=list)  # printed; they do not fail the plan

    @property
    def fits(self) -> bool:
        return not self.problems


def model_shapes(cfg: ExperimentConfig) -> Shapes:
    """Shapes of the policy (= reference), critic and reward model; BadInput names the key."""
    policy = resolve_shape(cfg.model.policy, "model.policy", tiny=cfg.model.tiny)
    reward = resolve_shape(cfg.model.reward, "model.reward") if cfg.model.reward else None
    critic = None
    if cfg.ppo.advantage == "gae":
        critic = reward if (cfg.critic.init == "reward" and reward is not None) else policy
    return Shapes(policy, critic, reward)


def role_memory(cfg: ExperimentConfig, shapes: Shapes, gpu_bytes: float) -> dict[str, pm.Memory]:
    """Per-actor estimate of every role (GPU run when placement.gpus_per_node > 0, else RAM)."""
    on_gpu = cfg.placement.gpus_per_node > 0
    runtime = pm.GPU_RUNTIME if on_gpu else pm.CPU_RUNTIME
    dtype, ro, ppo = cfg.model.dtype, cfg.rollout, cfg.ppo
    seq_len = cfg.data.max_prompt_tokens + ro.max_new_tokens
    step_samples = ppo.prompts_per_step * ro.n_samples
    per_engine = -(-step_samples // ro.engines)
    if ro.backend == "hf":
        rollout = pm.hf_engine_memory(shapes.policy, dtype, seq_len, per_engine, runtime)
    elif on_gpu:
        rollout = pm.vllm_memory(shapes.policy, dtype, ro.tensor_parallel_size, ro.gpu_memory_utilization,
                                 gpu_bytes, seq_len, per_engine, eager=False)
    else:
        rollout = pm.vllm_cpu_memory(shapes.policy, dtype, ro.kv_cache_gib)
    mb_tokens = ppo.micro_batch_size * seq_len
    out = {"rollout": rollout}
    out["policy"] = pm.learner_memory(shapes.policy, shapes.policy.causal_lm_params(), dtype, cfg.policy.zero_stage,
                                      cfg.policy.num_ranks, cfg.policy.offload, cfg.policy.gradient_checkpointing,
                                      mb_tokens, lm_head=True, runtime=runtime)
    if shapes.critic is not None:
        out["critic"] = pm.learner_memory(shapes.critic, shapes.critic.scalar_head_params(), dtype,
                                          cfg.critic.zero_stage, cfg.critic.num_ranks, cfg.critic.offload,
                                          cfg.critic.gradient_checkpointing, mb_tokens, lm_head=False,
                                          runtime=runtime)
    ref = cfg.reference
    reference = pm.reference_memory(shapes.policy, dtype, ref.zero_stage, ref.num_ranks, ref.offload,
                                    mb_tokens, runtime)
    if reference_in_policy(cfg):  # a second model in each policy rank's process (one runtime)
        policy = out["policy"]
        out["policy"] = replace(
            policy, parts={**policy.parts, "reference weights": reference.parts["weights"]},
            load_cpu=policy.load_cpu + reference.load_cpu, how=policy.how + "; holds the reference (reference.colocate)")
    else:
        out["reference"] = reference
    if shapes.reward is not None:
        out["reward"] = pm.reward_memory(shapes.reward, dtype, step_samples * seq_len, runtime)
    return out


# --------------------------------------------------------------------------- layout


def _group_roles(plan: ResourcePlan, gi: int) -> list[str]:
    return [spec.name for spec in plan.roles if any(s.group == gi for s in spec.slots)]


def lay_out(plan: ResourcePlan, nodes: tuple[Node, ...]) -> tuple[Layout | None, str | None]:
    """Places the groups on the nodes as Ray would: STRICT_PACK groups whole on one node
    (first fit, largest group first), PACK bundles on the first node with room. Returns
    (layout, None) or (None, one-line problem naming the role)."""
    free_gpus = [list(range(n.gpus)) for n in nodes]
    free_cpus = [n.cpus for n in nodes]
    bundles: list[list] = [[None] * len(g.bundles) for g in plan.groups]
    order = sorted(range(len(plan.groups)), key=lambda gi: -plan.groups[gi].total("GPU"))
    for gi in order:
        group = plan.groups[gi]
        # STRICT_PACK: all bundles on one node; PACK (CPU runs): bundle by bundle.
        asks = [list(range(len(group.bundles)))] if group.strategy == "STRICT_PACK" else \
            [[b] for b in range(len(group.bundles))]
        for ask in asks:
            gpus = int(sum(group.bundles[b].get("GPU", 0) for b in ask))
            cpus = sum(group.bundles[b].get("CPU", 0) for b in ask)
            host = next((i for i in range(len(nodes)) if len(free_gpus[i]) >= gpus and free_cpus[i] >= cpus), None)
            if host is None:
                roles = _group_roles(plan, gi)
                most_gpu = max((len(f) for f in free_gpus), default=0)
                most_cpu = max(free_cpus, default=0)
                have = f"{sum(n.gpus for n in nodes)} GPU, {sum(n.cpus for n in nodes):g} CPU on {len(nodes)} node(s)"
                return None, (f"{', '.join(roles)} {'does' if len(roles) == 1 else 'do'} not fit: placement group "
                              f"{group.name} needs {gpus} GPU and {cpus:g} CPU on one node; after placing the larger "
                              f"groups a node has at most {most_gpu} GPU and {most_cpu:g} CPU free (plan needs "
                              f"{plan.total('GPU'):g} GPU, {plan.total('CPU'):g} CPU for {plan.breakdown()}; "
                              f"cluster has {have})")
            free_cpus[host] -= cpus
            for b in ask:
                take = int(group.bundles[b].get("GPU", 0))
                bundles[gi][b] = (host, tuple(free_gpus[host][:take]))
                del free_gpus[host][:take]
    return Layout(bundles), None


# --------------------------------------------------------------------------- checks


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}" if x >= 0.095 * GIB or x == 0 else f"{x / GIB:.3f}"


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"


def _parts(mem: pm.Memory) -> str:
    return " + ".join(f"{k} {_gib(v)}" for k, v in mem.parts.items() if v)


def check_memory(plan: ClusterPlan) -> None:
    """Fills plan.loads; appends a problem per role that does not fit (engine budget, GPU,
    then CPU RAM) and a warning per role whose start-up peak exceeds its GPU."""
    on_gpu = plan.cfg.placement.gpus_per_node > 0
    ram: dict[int, list[tuple[str, float, float]]] = {}  # node -> [(actor, steady bytes, load bytes)]
    for spec in plan.resources.roles:
        mem = plan.memory[spec.name]
        if on_gpu and mem.claim is not None and mem.need > mem.claim:
            plan.problems.append(f"{spec.name} does not fit: an engine needs {_gib(mem.need)} GiB per GPU "
                                 f"({_parts(mem)}), rollout.gpu_memory_utilization gives it {_gib(mem.claim)} GiB")
        for i, slot in enumerate(spec.slots):
            host, gpus = plan.layout.bundles[slot.group][slot.bundle]
            for g in gpus if on_gpu else ():
                plan.loads.setdefault((host, g), []).append((f"{spec.name}[{i}]", mem.held))
            steady = mem.offloaded if on_gpu else mem.need
            ram.setdefault(host, []).append((f"{spec.name}[{i}]", steady, mem.load_cpu if on_gpu else 0.0))
            gpu_have = plan.cluster.nodes[host].gpu_memory_gib * GIB
            if on_gpu and i == 0 and mem.load_gpu > gpu_have:
                plan.warnings.append(
                    f"{spec.name}: start-up needs the whole model, {_gib(mem.load_gpu)} GiB, on one "
                    f"{_gib(gpu_have)} GiB GPU: LearnerRank hands the unpartitioned module to deepspeed.initialize, "
                    f"which moves it to the GPU before partitioning (plan_memory.LEARNER_PARTITIONS_ON_LOAD)")
    _check_gpus(plan)
    _check_ram(plan, ram, on_gpu)


def _role_of(actor: str) -> str:
    return actor.split("[")[0]


def _check_gpus(plan: ClusterPlan) -> None:
    seen = {p.split(" ")[0] for p in plan.problems}
    for (host, g), actors in sorted(plan.loads.items()):
        node = plan.cluster.nodes[host]
        total, have = sum(b for _, b in actors), node.gpu_memory_gib * GIB
        role = _role_of(max(actors, key=lambda a: a[1])[0])
        if total > have and role not in seen:
            seen.add(role)
            shared = f" with {', '.join(a for a, _ in actors)} on it" if len(actors) > 1 else ""
            plan.problems.append(f"{role} does not fit: GPU {g} of {node.name} needs {_gib(total)} GiB{shared}, "
                                 f"has {_gib(have)} GiB ({role}: {_parts(plan.memory[role])})")


def _check_ram(plan: ClusterPlan, ram: dict[int, list[tuple[str, float, float]]], on_gpu: bool) -> None:
    # Start-up (every model read whole into RAM) and steady state (offloaded states) do not
    # overlap much: each actor frees its full copy once its model is partitioned or on the GPU.
    for host, actors in sorted(ram.items()):
        node = plan.cluster.nodes[host]
        steady, load = sum(a[1] for a in actors), sum(a[2] for a in actors)
        if node.memory_gib is None or max(steady, load) <= node.memory_gib * GIB:
            continue
        col = 1 if steady >= load else 2
        role = _role_of(max(actors, key=lambda a: a[col])[0])
        what = ("offloaded states" if on_gpu else "actors") if col == 1 else "models loading at start-up"
        plan.problems.append(f"{role} does not fit: {what} on {node.name} need {_gib(max(steady, load))} GiB "
                             f"of CPU RAM, the node has {node.memory_gib:g} GiB")


def make_plan(cfg: ExperimentConfig, cluster: Cluster) -> ClusterPlan:
    """The whole plan; BadInput only for inputs that cannot be planned at all (unknown model,
    impossible layout); problems that a bigger cluster would solve are in `.problems`."""
    resources = plan_resources(cfg)
    shapes = model_shapes(cfg)
    gpu_nodes = [n for n in cluster.nodes if n.gpus]
    gpu_bytes = min((n.gpu_memory_gib for n in gpu_nodes), default=0.0) * GIB
    memory = role_memory(cfg, shapes, gpu_bytes)
    nodes = cluster.nodes
    if cluster.cpus_follow_plan:  # an embedded local Ray gets as many logical CPUs as the plan needs
        nodes = tuple(replace(n, cpus=max(n.cpus, resources.total("CPU"))) for n in nodes)
        cluster = replace(cluster, nodes=nodes)
    layout, problem = lay_out(resources, nodes)
    plan = ClusterPlan(cfg, cluster, resources, shapes, memory, layout, {}, [problem] if problem else [])
    if layout is not None:
        check_memory(plan)
    return plan


# --------------------------------------------------------------------------- report


def _cluster_lines(cluster: Cluster) -> list[str]:
    lines, counts = [f"cluster: {cluster.source}"], {}
    for n in cluster.nodes:
        counts.setdefault(n.kind, [0, n])[0] += 1
    for kind, (count, n) in counts.items():
        gpu = f"{n.gpus} x {n.gpu_memory_gib:g} GiB GPU ({n.gpu_label})" if n.gpus else "no GPU"
        ram = f", {n.memory_gib:.0f} GiB RAM" if n.memory_gib else ""
        lines.append(f"  {count} x {kind}: {gpu}, {n.cpus:g} CPU{ram}")
    return lines + [f"  note: {note}" for note in cluster.notes]


def _model_lines(plan: ClusterPlan) -> list[str]:
    s, cfg = plan.shapes, plan.cfg
    lines = [f"models ({cfg.model.dtype}):",
             f"  policy/reference {cfg.model.policy}: {_count(s.policy.causal_lm_params())} params "
             f"[{s.policy.source}]"]
    if s.reward is not None:
        lines.append(f"  reward {cfg.model.reward}: {_count(s.reward.scalar_head_params())} params "
                     f"[{s.reward.source}]")
    if s.critic is not None:
        lines.append(f"  critic (from the {cfg.critic.init if s.critic is s.reward else 'policy'}): "
                     f"{_count(s.critic.scalar_head_params())} params")
    return lines


def _node_lines(plan: ClusterPlan) -> list[str]:
    nodes, lines = plan.cluster.nodes, ["where (node, GPU: GiB held of GiB, actors):"]
    on_gpu = plan.cfg.placement.gpus_per_node > 0
    by_host: dict[int, list[str]] = {}
    for spec in plan.resources.roles:
        for i, slot in enumerate(spec.slots):
            host, _ = plan.layout.bundles[slot.group][slot.bundle]
            by_host.setdefault(host, []).append(f"{spec.name}[{i}]")
    for host in sorted(by_host):
        node = nodes[host]
        lines.append(f"  {node.name} ({node.kind})")
        if not on_gpu:
            lines.append(f"    CPU: {', '.join(by_host[host])}")
            continue
        for g in range(node.gpus):
            actors = plan.loads.get((host, g), [])
            if actors:
                who = " + ".join(f"{a} {_gib(b)}" for a, b in actors)
                lines.append(f"    GPU {g}: {_gib(sum(b for _, b in actors))} of {node.gpu_memory_gib:g}  {who}")
    return lines


def _memory_lines(plan: ClusterPlan) -> list[str]:
    where = "GiB per GPU" if plan.cfg.placement.gpus_per_node else "GiB of RAM (CPU run)"
    cols = ["weights", "gradients", "optimizer", "buffers", "activations", "kv cache", "runtime"]
    column_of = {"cuda graphs": "buffers", "kv cache (min)": "kv cache", "reference weights": "weights"}
    lines = [f"memory per actor ({where}; rules in orchestrator/cluster/plan_memory.py):",
             f"  {'role':<10}{'actors':>8}" + "".join(f"{c[:9]:>10}" for c in cols)
             + f"{'needs':>8}{'holds':>8}{'CPU RAM':>9}"]
    for spec in plan.resources.roles:
        mem = plan.memory[spec.name]
        vals = dict.fromkeys(cols, 0.0)
        for part, value in mem.parts.items():
            vals[column_of.get(part, part)] += value
        if "kv_cache" in mem.extra:  # vLLM: show the cache it will get, not the minimum it needs
            vals["kv cache"] = mem.extra["kv_cache"]
        actors = f"{spec.count}x{spec.num_gpus:g}" if spec.num_gpus not in (0, 1) else str(spec.count)
        lines.append(f"  {spec.name:<10}{actors:>8}" + "".join(f"{_gib(v) if v else '-':>10}" for v in vals.values())
                     + f"{_gib(mem.need):>8}{_gib(mem.held):>8}{_gib(mem.offloaded) if mem.offloaded else '-':>9}")
    lines += [f"  {spec.name}: {plan.memory[spec.name].how}" for spec in plan.resources.roles]
    return lines


def format_plan(plan: ClusterPlan, config_name: str) -> str:
    lines = [f"plan for {config_name}", *_cluster_lines(plan.cluster), *_model_lines(plan),
             plan.resources.describe()]
    if plan.layout is not None:
        lines += _node_lines(plan)
    lines += _memory_lines(plan)
    lines += [f"warning: {w}" for w in plan.warnings]
    if plan.fits:
        loads = [(sum(b for _, b in a), plan.cluster.nodes[h], g) for (h, g), a in plan.loads.items()]
        if loads:
            top, node, g = max(loads, key=lambda t: t[0] / (t[1].gpu_memory_gib * GIB))
            lines.append(f"fits: fullest GPU is GPU {g} of {node.name}, {_gib(top)} of {node.gpu_memory_gib:g} GiB")
        else:
            used = {}
            for spec in plan.resources.roles:
                for slot in spec.slots:
                    host = plan.layout.bundles[slot.group][slot.bundle][0]
                    used[host] = used.get(host, 0.0) + plan.memory[spec.name].need
            lines.append("fits: " + "; ".join(
                f"{plan.cluster.nodes[h].name} needs {_gib(b)} GiB of RAM"
                + (f" of {plan.cluster.nodes[h].memory_gib:.0f}" if plan.cluster.nodes[h].memory_gib else "")
                for h, b in used.items()))
    else:
        lines += ["does not fit:", *(f"  {p}" for p in plan.problems)]
    return "\n".join(lines)


def run_plan(config: str, overrides: list[str], cluster_file: str | None, node_type: str | None) -> int:
    """`rlhf plan`: prints the plan; BadInput (exit 2) naming the first role that does not fit."""
    from rlhf.orchestrator.config import load_config

    cfg = load_config(config, overrides)
    cluster = load_cluster(cluster_file, node_type)
    plan = make_plan(cfg, cluster)
    print(format_plan(plan, config))
    if not plan.fits:
        raise BadInput(f"plan: {plan.problems[0]}")
    return 0


def register(sub) -> None:
    """Adds `rlhf plan` to the CLI's subcommands."""
    cmd = sub.add_parser("plan", help="where each role goes on a cluster and whether its GPU memory fits")
    cmd.add_argument("config", help="experiment YAML, e.g. configs/llama3.1-8b-ppo-1node.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    cmd.add_argument("--cluster", default=None, metavar="FILE",
                     help="Ray cluster YAML (e.g. deploy/azure/cluster.yaml) or a node list; default: this machine")
    cmd.add_argument("--node-type", default=None, metavar="NAME",
                     help="plan on this node type of the cluster YAML only (default: the GPU type with most memory)")
    cmd.set_defaults(func=lambda args: run_plan(args.config, args.overrides, args.cluster, args.node_type))
