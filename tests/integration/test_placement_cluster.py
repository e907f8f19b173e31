"""Placement on a simulated two-node GPU cluster (logical GPUs, no hardware).

A head with no GPUs and two worker nodes with 4 logical GPUs each, named by a custom
resource. Real Ray actors are started with the plan's strategies and report where they
landed. One module-scoped cluster, since starting it costs about 15 s.
"""
from __future__ import annotations

import time

import pytest
import ray
import ray._private.services
from ray.cluster_utils import Cluster
from ray.util import placement_group, placement_group_table, remove_placement_group

from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.ppo.placement import create_placement_groups, plan_resources

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False})
    for name in ("worker_a", "worker_b"):
        cluster.add_node(num_cpus=6, num_gpus=4, resources={name: 1}, node_ip_address=LOOPBACK)
    # ray.init rewrites a 127.0.0.1 address to the machine's outward IP, where this loopback-only
    # cluster does not listen; keep the address as given while connecting.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
    cluster.wait_for_nodes()
    names = {n["NodeID"]: next((r for r in n["Resources"] if r.startswith("worker_")), "head")
             for n in ray.nodes() if n["Alive"]}
    yield names
    ray.shutdown()
    cluster.shutdown()


@ray.remote
class Probe:
    """Reports the node it runs on and the (logical) GPU ids Ray assigned to it."""

    def where(self):
        return ray.get_runtime_context().get_node_id(), sorted(str(i) for i in ray.get_gpu_ids())


def start_probes(pgs):
    """One Probe per actor of the plan; returns {(role, i): (node_id, gpu_ids)} and the handles."""
    keys, actors = [], []
    for spec in pgs.plan.roles:
        for i in range(spec.count):
            keys.append((spec.name, i))
            actors.append(Probe.options(scheduling_strategy=pgs.strategy(spec.name, i),
                                        **pgs.resources(spec.name)).remote())
    found = ray.get([a.where.remote() for a in actors], timeout=60)
    return dict(zip(keys, found)), actors


def bundle_nodes(pgs):
    """[group][bundle] -> node id, from Ray's placement group table."""
    return [placement_group_table(pg)["bundles_to_node_id"] for pg in pgs.groups]


def wait_for_free_gpus(n, timeout_s=15):
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) != n:
        assert time.monotonic() < deadline, f"GPUs free: {ray.available_resources().get('GPU')}, expected {n}"
        time.sleep(0.2)


def config(**sections):
    return build_config({"placement": {"timeout_s": 30, **sections.pop("placement")}, **sections})


DISAGG = dict(placement={"gpus_per_node": 4}, rollout={"engines": 2, "tensor_parallel_size": 2},
              policy={"num_ranks": 2}, critic={"num_ranks": 1})  # 4 + 2 + 1 + 1 = 8 GPU: both nodes


def test_disaggregated_roles_land_on_their_planned_bundles_with_distinct_gpus(cluster):
    plan = plan_resources(config(**DISAGG))
    pgs = create_placement_groups(plan, timeout_s=30)
    try:
        where, actors = start_probes(pgs)
        bundles = bundle_nodes(pgs)
        for (role, i), (node, gpus) in where.items():
            slot = plan.role(role).slots[i]
            assert node == bundles[slot.group][slot.bundle], (role, i)
            assert len(gpus) == plan.role(role).num_gpus, (role, i)
        # The rollout group (4 GPUs, STRICT_PACK) fills one worker; everything else is on the other.
        rollout_nodes = {cluster[where["rollout", i][0]] for i in range(2)}
        other_nodes = {cluster[node] for (role, _), (node, _) in where.items() if role != "rollout"}
        assert len(rollout_nodes) == 1 and len(other_nodes) == 1 and rollout_nodes != other_nodes
        assert rollout_nodes | other_nodes == {"worker_a", "worker_b"}
        used = [(node, gpu) for node, gpus in where.values() for gpu in gpus]
        assert len(used) == len(set(used)) == 8  # no GPU shared between actors
        for actor in actors:
            ray.kill(actor)
    finally:
        pgs.remove()


def test_colocated_roles_share_gpus_bundle_by_bundle(cluster):
    plan = plan_resources(config(placement={"gpus_per_node": 4, "mode": "colocated"},
                                 rollout={"engines": 2, "n_samples": 2}, policy={"num_ranks": 2},
                                 ppo={"advantage": "grpo"}))
    pgs = create_placement_groups(plan, timeout_s=30)
    try:
        where, actors = start_probes(pgs)
        assert len({node for node, _ in where.values()}) == 1  # one STRICT_PACK group, one node
        for i in range(2):
            assert where["policy", i][1] == where["rollout", i][1] and len(where["policy", i][1]) == 1
        assert where["reference", 0][1] == where["policy", 0][1]
        assert where["policy", 0][1] != where["policy", 1][1]
        for actor in actors:
            ray.kill(actor)
    finally:
        pgs.remove()


def test_infeasible_plan_fails_fast_with_needed_vs_available(cluster):
    plan = plan_resources(config(placement={"gpus_per_node": 4}, policy={"num_ranks": 8},
                                 ppo={"micro_batch_size": 1}))  # 1 + 8 + 1 + 1 = 11 GPU > 8
    start = time.monotonic()
    with pytest.raises(BadInput, match=r"needs 11 GPU for rollout\(1\) \+ policy\(8\) .*cluster has 8 GPU \(3 nodes\)"):
        create_placement_groups(plan, timeout_s=60)
    assert time.monotonic() - start < 30


def test_groups_that_cannot_be_placed_now_time_out_and_are_removed(cluster):
    # Another job holds 3 GPUs: the 8-GPU plan fits the cluster on paper but not now.
    blocker = placement_group([{"GPU": 3.0}], strategy="STRICT_PACK")
    ray.get(blocker.ready(), timeout=30)
    try:
        wait_for_free_gpus(5)  # groups removed by earlier tests are released asynchronously
        plan = plan_resources(config(**DISAGG))
        start = time.monotonic()
        with pytest.raises(BadInput, match=r"not ready after 2s .* needs 8 GPU, 6 CPU .* cluster had 5 of 8 GPU"):
            create_placement_groups(plan, timeout_s=2)
        assert time.monotonic() - start < 30
        states = [t["state"] for pid, t in placement_group_table().items() if pid != blocker.id.hex()]
        assert states and set(states) == {"REMOVED"}
    finally:
        remove_placement_group(blocker)
