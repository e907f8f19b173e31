"""Placement plans from configs (no Ray): counts, fractions, bundles, and pre-flight messages."""
from __future__ import annotations

import pytest

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.ppo.placement import Slot, Threads, plan_resources, plan_threads, preflight, reward_in_driver


def plan(**sections):
    return plan_resources(build_config(sections))


def nodes(n, cpu, gpu):
    """A fake `resources` dict: n identical nodes."""
    return {"CPU": n * cpu, "GPU": n * gpu, "nodes": [{"CPU": cpu, "GPU": gpu} for _ in range(n)]}


DISAGG = dict(placement={"gpus_per_node": 8}, rollout={"engines": 4, "tensor_parallel_size": 2},
              policy={"num_ranks": 4}, ppo={"micro_batch_size": 2})


def test_cpu_plan_one_cpu_bundle_per_actor_no_critic_without_gae():
    p = plan(ppo={"advantage": "grpo"}, rollout={"engines": 2, "n_samples": 2}, reference={"colocate": False})
    assert p.mode == "cpu" and p.role_names == ("rollout", "policy", "reference")
    assert [(r.count, r.num_cpus, r.num_gpus) for r in p.roles] == [(2, 1, 0), (1, 1, 0), (1, 1, 0)]
    (group,) = p.groups
    assert group.strategy == "PACK" and group.bundles == ({"CPU": 1.0},) * 4
    assert p.role("rollout").slots == (Slot(0, 0), Slot(0, 1))
    assert p.role("reference").slots == (Slot(0, 3),)
    assert p.total("CPU") == 4 and p.total("GPU") == 0
    with pytest.raises(KeyError, match="critic"):
        p.role("critic")


def test_reference_inside_the_policy_ranks_on_cpu_by_default():
    assert plan().role_names == ("rollout", "policy", "critic")  # auto on CPU: no reference actor
    assert plan(reference={"num_ranks": 2}).role("reference").count == 2  # cannot mirror 1 policy rank
    assert plan(reference={"zero_stage": 3}).role("reference").count == 1
    assert "reference" in plan(**DISAGG).role_names  # auto: CPU runs only
    assert "reference" not in plan(**DISAGG, reference={"colocate": True, "num_ranks": 4}).role_names


@pytest.mark.parametrize("sections, expected", [
    # grpo, reference in the policy, sampler old log-probs: every phase has one process computing
    (dict(ppo={"advantage": "grpo", "old_logprobs": "sampler"}, rollout={"n_samples": 2}), Threads(4, 4, 4)),
    # gae: policy and critic train at once; experience runs policy (reference) and critic
    (dict(), Threads(4, 2, 2)),
    # a reward model and a separate reference share the experience phase with the policy
    (dict(model={"reward": "rm"}, reference={"colocate": False}, ppo={"advantage": "grpo"},
          rollout={"n_samples": 2}), Threads(4, 4, 1)),
    # rollout.overlap: the engine generates while the policy trains
    (dict(ppo={"advantage": "grpo"}, rollout={"n_samples": 2, "overlap": True}), Threads(2, 2, 4)),
    (dict(placement={"cpu_threads": 3}), Threads(3, 3, 3)),
    (dict(placement={"gpus_per_node": 8}), Threads(1, 1, 1)),
])
def test_threads_share_the_cores_among_the_actors_of_each_phase(sections, expected):
    assert plan_threads(build_config(sections), cores=4) == expected


def test_reward_role_only_with_reward_model():
    assert "reward" not in plan().role_names
    assert plan(model={"reward": "some/rm"}).role("reward").count == 1


def test_reward_functions_alone_are_scored_in_the_driver_unless_an_actor_is_asked_for():
    functions = {"reward": {"functions": {"digit_fraction": 1.0}}}
    assert reward_in_driver(build_config(functions))  # auto
    assert not reward_in_driver(build_config({"reward": {"functions": {"digit_fraction": 1.0}, "scorer": "actor"}}))
    assert not reward_in_driver(build_config({**functions, "model": {"reward": "some/rm"}}))
    assert not reward_in_driver(build_config({**functions, "model": {"rule_reward": "some/rules"}}))


def test_disaggregated_plan_gives_each_role_its_own_node_sized_groups():
    p = plan(**DISAGG)
    assert p.mode == "disaggregated"
    assert [(r.name, r.count, r.num_gpus) for r in p.roles] == [
        ("rollout", 4, 2), ("policy", 4, 1), ("critic", 1, 1), ("reference", 1, 1)]
    assert [(g.name, g.strategy, len(g.bundles), g.total("GPU")) for g in p.groups] == [
        ("rollout/0", "STRICT_PACK", 4, 8), ("policy/0", "STRICT_PACK", 4, 4),
        ("critic/0", "STRICT_PACK", 1, 1), ("reference/0", "STRICT_PACK", 1, 1)]
    assert p.groups[0].bundles[0] == {"CPU": 1.0, "GPU": 2.0}
    assert p.role("rollout").slots == tuple(Slot(0, b) for b in range(4))
    assert p.role("policy").slots == tuple(Slot(1, b) for b in range(4))
    assert p.total("GPU") == 14 and p.total("CPU") == 10


def test_disaggregated_splits_a_role_larger_than_a_node():
    p = plan(placement={"gpus_per_node": 4}, rollout={"engines": 3, "tensor_parallel_size": 2},
             policy={"num_ranks": 8}, ppo={"micro_batch_size": 1})
    rollout, policy = p.role("rollout"), p.role("policy")
    # 2 engines of 2 GPUs fill a 4-GPU group; the third opens a second group.
    assert rollout.slots == (Slot(0, 0), Slot(0, 1), Slot(1, 0))
    assert policy.slots == tuple(Slot(2 + i // 4, i % 4) for i in range(8))
    assert all(g.total("GPU") <= 4 for g in p.groups)


def test_colocated_plan_shares_one_gpu_bundle_per_rank_with_quarter_fractions():
    p = plan(placement={"gpus_per_node": 8, "mode": "colocated"}, rollout={"engines": 4},
             policy={"num_ranks": 4}, critic={"num_ranks": 4}, ppo={"micro_batch_size": 2})
    assert p.mode == "colocated"
    assert {r.name: r.num_gpus for r in p.roles} == {"rollout": 0.25, "policy": 0.25, "critic": 0.25,
                                                     "reference": 0.25}
    (group,) = p.groups
    assert group.strategy == "STRICT_PACK" and len(group.bundles) == 4 and group.total("GPU") == 4
    for role in ("rollout", "policy", "critic"):
        assert p.role(role).slots == tuple(Slot(0, b) for b in range(4))
    assert p.role("reference").slots == (Slot(0, 0),)
    # Bundle 0 holds four actors (one CPU each); the others three.
    assert [b["CPU"] for b in group.bundles] == [4, 3, 3, 3]
    assert "rollout[0] (1 CPU, 0.25 GPU), policy[0]" in p.describe()


def test_colocated_fractions_follow_the_number_of_gpu_roles():
    no_critic = plan(placement={"gpus_per_node": 2, "mode": "colocated"}, ppo={"advantage": "rloo"},
                     rollout={"n_samples": 2})
    assert {r.num_gpus for r in no_critic.roles} == {0.3333}
    with_rm = plan(placement={"gpus_per_node": 4, "mode": "colocated"}, rollout={"engines": 2},
                   policy={"num_ranks": 2}, ppo={"micro_batch_size": 2}, model={"reward": "rm"})
    assert {r.num_gpus for r in with_rm.roles} == {0.2}
    assert with_rm.role("reward").slots == (Slot(0, 1),)  # spread: reference on 0, reward on 1


def test_colocated_groups_are_node_sized():
    p = plan(placement={"gpus_per_node": 2, "mode": "colocated"}, rollout={"engines": 4, "n_samples": 2},
             policy={"num_ranks": 4}, ppo={"micro_batch_size": 2, "advantage": "grpo"})
    assert [g.name for g in p.groups] == ["shared/0", "shared/1"]
    assert p.role("policy").slots == (Slot(0, 0), Slot(0, 1), Slot(1, 0), Slot(1, 1))


def test_layouts_that_cannot_work_are_bad_input():
    with pytest.raises(BadInput, match="must be on one node, but placement.gpus_per_node is 4"):
        plan(placement={"gpus_per_node": 4}, rollout={"tensor_parallel_size": 8})
    with pytest.raises(BadInput, match="tensor_parallel_size must be 1"):
        plan(placement={"gpus_per_node": 8, "mode": "colocated"}, rollout={"tensor_parallel_size": 2})


def test_preflight_passes_when_the_cluster_fits():
    preflight(plan(**DISAGG), nodes(2, 16, 8))
    preflight(plan(), {"CPU": 4, "GPU": 0})  # no per-node information: totals only


def test_preflight_names_needed_vs_available_gpus():
    p = plan(placement={"gpus_per_node": 4}, rollout={"engines": 4, "tensor_parallel_size": 2, "n_samples": 2},
             policy={"num_ranks": 4}, ppo={"micro_batch_size": 2, "advantage": "grpo"})
    with pytest.raises(BadInput) as err:
        preflight(p, nodes(2, 16, 2))
    assert str(err.value) == ("placement: needs 13 GPU for rollout(4x2) + policy(4) + reference(1), "
                              "cluster has 4 GPU (2 nodes)")
    assert "\n" not in str(err.value)


def test_preflight_checks_cpus_and_colocated_totals():
    with pytest.raises(BadInput, match=r"needs 4 CPU for rollout\(1\) \+ policy\(1\) .*cluster has 2 CPU \(1 node\)"):
        preflight(plan(reference={"colocate": False}), nodes(1, 2, 0))
    colo = plan(placement={"gpus_per_node": 4, "mode": "colocated"}, rollout={"engines": 4},
                policy={"num_ranks": 4}, ppo={"micro_batch_size": 2})
    with pytest.raises(BadInput, match=r"needs 4 GPU for colocated rollout\(4x0.25\) .* on 4 shared GPU, "
                                       r"cluster has 2 GPU"):
        preflight(colo, nodes(1, 32, 2))


def test_preflight_rejects_a_group_larger_than_any_node():
    # 8 GPUs in total, but the plan was made for 8-GPU nodes and the nodes have 4.
    p = plan(placement={"gpus_per_node": 8}, rollout={"tensor_parallel_size": 8, "n_samples": 2},
             ppo={"advantage": "grpo"})
    with pytest.raises(BadInput, match=r"group rollout/0 needs 8 GPU and 1 CPU on one node \(STRICT_PACK\), "
                                       r"but no node has that much \(largest node: 4 GPU\)"):
        preflight(p, nodes(3, 16, 4))
