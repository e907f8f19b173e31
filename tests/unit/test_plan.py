"""`rlhf plan`: memory arithmetic by hand, model shapes, cluster descriptions, and the verdict
(fits -> exit 0 with the placement printed; does not fit -> exit 2, one line naming the role)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.cluster import plan_memory as pm
from rlhf.orchestrator.cli import main
from rlhf.orchestrator.cluster.cluster_spec import load_cluster
from rlhf.orchestrator.config import build_config
from rlhf.orchestrator.errors import BadInput, ConfigError
from rlhf.orchestrator.cluster.model_catalog import CATALOG, ModelShape, resolve_shape
from rlhf.orchestrator.ppo.placement import Slot, plan_resources

ROOT = Path(__file__).resolve().parents[2]
AZURE = ROOT / "deploy" / "azure" / "cluster.yaml"
REAL_RUNS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "node" in p.name)
GB = 1e9

# A Ray cluster YAML of our own, in the autoscaler's format (the Azure file is tested below).
RAY_YAML = {
    "cluster_name": "t", "max_workers": 3, "head_node_type": "head",
    "provider": {"type": "azure", "location": "eastus", "resource_group": "rg"},
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {"azure_arm_parameters": {"vmSize": "Standard_D16s_v5"}}},
        "a100": {"max_workers": 2, "resources": {"CPU": 96, "GPU": 8},
                 "node_config": {"azure_arm_parameters": {"vmSize": "Standard_ND96asr_v4"}}},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "memory": 100 * 1024**3},
                 "labels": {"gpu-memory-gib": "79"}, "node_config": {"azure_arm_parameters": {"vmSize": "custom"}}},
    },
}


def write(tmp_path, data, name="cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def one_node(tmp_path, gpus=8, gib=79.0, count=1) -> str:
    return write(tmp_path, {"nodes": [{"name": "n", "count": count, "gpus": gpus, "gpu_memory_gib": gib,
                                       "memory_gib": 1600}]}, "simple.yaml")


def run(capsys, *argv):
    code = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- arithmetic


def test_zero_states_by_hand():
    # 7e9 params, bf16 + Adam: weights 2 B, gradients 2 B, fp32 master + m + v 12 B per param.
    assert pm.zero_states(7 * 10**9, "bfloat16", 0, 4, False) == {
        "weights": 14 * GB, "gradients": 14 * GB, "optimizer": 84 * GB, "cpu": 0.0}
    assert pm.zero_states(7 * 10**9, "bfloat16", 1, 4, False)["optimizer"] == 84 * GB / 4  # 21 GB
    assert pm.zero_states(7 * 10**9, "bfloat16", 2, 4, False) == {
        "weights": 14 * GB, "gradients": 3.5 * GB, "optimizer": 21 * GB, "cpu": 0.0}
    assert pm.zero_states(7 * 10**9, "bfloat16", 3, 8, False) == {
        "weights": 1.75 * GB, "gradients": 1.75 * GB, "optimizer": 10.5 * GB, "cpu": 0.0}
    # float32 Adam keeps m + v only (8 B): 56 GB / 4 = 14 GB.
    assert pm.zero_states(7 * 10**9, "float32", 2, 4, False)["optimizer"] == 14 * GB
    # Offload: Adam 21 GB + fp32 gradient partition 4 B x 7e9 / 4 = 7 GB in CPU RAM.
    assert pm.zero_states(7 * 10**9, "bfloat16", 2, 4, True) == {
        "weights": 14 * GB, "gradients": 0.0, "optimizer": 0.0, "cpu": 28 * GB}
    # ... and at stage 3 the 14 / 4 = 3.5 GB weight partition too.
    assert pm.zero_states(7 * 10**9, "bfloat16", 3, 4, True) == {
        "weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "cpu": 31.5 * GB}


SMALL = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000)  # head_dim 16


def test_activations_and_kv_by_hand():
    # Per token and layer (6H + 2 kv_dim + 4I) = 384 + 64 + 512 = 960 values x 2 B = 1920 B.
    assert pm.train_activations(SMALL, 100, "bfloat16", False, lm_head=False) == 2 * 100 * 1920
    # Checkpointing: layer inputs (H = 64 values x 2 B per token and layer) + one layer.
    assert pm.train_activations(SMALL, 100, "bfloat16", True, lm_head=False) == 2 * 100 * 128 + 100 * 1920
    # Log-prob head: 3 x min(100, 1024) rows x V x 4 B.
    assert pm.train_activations(SMALL, 100, "bfloat16", False, lm_head=True) == 2 * 100 * 1920 + 3 * 100 * 1000 * 4
    assert pm.inference_activations(SMALL, 100, "float32", lm_head=False) == 100 * (4 * 64 + 2 * 128) * 4
    # KV: 2 (K, V) x 32 layers x 8 heads x 128 x 2 B = 131,072 B per token (Llama-3.1-8B);
    # 70B under TP 4: 2 x 80 x 8/4 x 128 x 2 = 81,920 B.
    assert pm.kv_bytes_per_token(CATALOG["meta-llama/Llama-3.1-8B"], "bfloat16", 1) == 131072
    assert pm.kv_bytes_per_token(CATALOG["meta-llama/Llama-3.1-70B"], "bfloat16", 4) == 81920
    assert pm.kv_bytes_per_token(CATALOG["meta-llama/Llama-3.1-70B"], "bfloat16", 16) == 2 * 80 * 1 * 128 * 2


def test_vllm_engine_claims_its_budget_and_the_kv_cache_gets_the_rest():
    shape = CATALOG["meta-llama/Llama-3.1-8B"]
    mem = pm.vllm_memory(shape, "bfloat16", tp=1, utilization=0.9, gpu_bytes=80 * pm.GIB, seq_len=2048,
                         seqs=100, eager=False)
    assert mem.held == 72 * pm.GIB
    weights = 2 * 8_030_261_248
    assert mem.parts["weights"] == weights
    fixed = weights + mem.parts["activations"] + pm.VLLM_CUDA_GRAPHS + pm.GPU_RUNTIME
    assert mem.extra["kv_cache"] == pytest.approx(72 * pm.GIB - fixed)
    assert mem.extra["kv_sequences"] == pytest.approx(mem.extra["kv_cache"] / (2048 * 131072))


def test_catalogue_parameter_counts_match_the_published_ones():
    assert CATALOG["meta-llama/Llama-3.1-8B"].causal_lm_params() == 8_030_261_248
    assert CATALOG["meta-llama/Llama-3.1-70B"].causal_lm_params() == 70_553_706_496
    assert CATALOG["Qwen/Qwen2.5-0.5B"].causal_lm_params() == 494_032_768  # tied, q/k/v biases
    assert CATALOG["Qwen/Qwen2.5-7B"].causal_lm_params() == 7_615_616_512


def test_shapes_from_a_folder_the_catalogue_and_unknown_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}))
    assert resolve_shape(str(tmp_path), "model.policy").causal_lm_params() == 494_032_768
    assert resolve_shape("Qwen/Qwen2.5-0.5B-Instruct", "model.policy").causal_lm_params() == 494_032_768
    with pytest.raises(BadInput, match="model.reward: unknown model 'acme/rm'"):
        resolve_shape("acme/rm", "model.reward")


# --------------------------------------------------------------------------- clusters


def test_ray_cluster_yaml_node_types_counts_and_gpu_memory(tmp_path):
    path = write(tmp_path, RAY_YAML)
    cluster = load_cluster(path)  # two GPU types: planned on the one with most memory per GPU
    assert sorted(n.name for n in cluster.nodes) == ["h100/0", "h100/1", "h100/2", "head/head"]  # max_workers 3
    (head,) = [n for n in cluster.nodes if n.is_head]
    assert head.gpus == 0 and head.cpus == 0
    h100 = next(n for n in cluster.nodes if n.kind == "h100")
    assert (h100.gpus, h100.gpu_memory_gib, h100.cpus, h100.memory_gib) == (8, 79.0, 96, 100)
    assert "a100" in cluster.notes[0]
    a100 = load_cluster(path, node_type="a100")
    assert sorted(n.name for n in a100.nodes) == ["a100/0", "a100/1", "head/head"]
    node = next(n for n in a100.nodes if n.gpus)
    assert node.gpu_memory_gib == 39.0 and node.memory_gib == 900  # from the vmSize table
    with pytest.raises(BadInput, match="--node-type: no node type 'v100'"):
        load_cluster(path, node_type="v100")


def test_ray_cluster_yaml_without_gpu_memory_is_bad_input(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(RAY_YAML))
    del data["available_node_types"]["h100"]["labels"]
    with pytest.raises(BadInput, match=r"available_node_types.h100: GPU memory unknown \(vmSize 'custom'\)"):
        load_cluster(write(tmp_path, data))


def test_simple_format_and_its_errors(tmp_path):
    cluster = load_cluster(one_node(tmp_path, count=2))
    assert [(n.name, n.gpus, n.gpu_memory_gib, n.cpus) for n in cluster.nodes] == [
        ("n/0", 8, 79.0, 64), ("n/1", 8, 79.0, 64)]  # 8 CPUs per GPU by default
    with pytest.raises(BadInput, match=r"nodes.0.gpus: Input should be greater than or equal to 0"):
        load_cluster(write(tmp_path, {"nodes": [{"gpus": -1}]}))
    with pytest.raises(BadInput, match="has GPUs but no gpu_memory_gib"):
        load_cluster(write(tmp_path, {"nodes": [{"gpus": 2}]}))
    with pytest.raises(BadInput, match="expected a Ray cluster YAML"):
        load_cluster(write(tmp_path, {"workers": 3}))


def test_the_azure_cluster_yaml_parses():
    cluster = load_cluster(AZURE)
    gpu = [n for n in cluster.nodes if n.gpus]
    assert len(gpu) == 4 and {(n.gpus, n.gpu_memory_gib) for n in gpu} == {(8, 79.0)}
    assert all(not n.gpus and n.cpus == 0 for n in cluster.nodes if n.is_head)  # the head runs no work
    a100 = [n for n in load_cluster(AZURE, node_type="ray.worker.a100").nodes if n.gpus]
    assert {(n.gpus, n.gpu_memory_gib) for n in a100} == {(8, 39.0)}


# --------------------------------------------------------------------------- verdicts


def test_real_run_configs_are_there():
    names = {p.name for p in REAL_RUNS}
    assert {"llama3.1-8b-ppo-1node.yaml", "llama3.1-8b-ppo-1node-colocated.yaml",
            "llama3.1-70b-ppo-4node.yaml"} <= names


@pytest.mark.parametrize("path", REAL_RUNS, ids=[p.name for p in REAL_RUNS])
def test_each_real_run_config_fits_on_the_azure_cluster(capsys, path):
    code, out, err = run(capsys, path, "--cluster", AZURE)
    assert code == 0, err
    assert "fits: fullest GPU is" in out
    assert "rollout[0]" in out and "policy[0]" in out and "    GPU 0: " in out  # who runs on which GPU
    assert "(STRICT_PACK)" in out  # the placement groups


def test_70b_reference_is_sharded_over_four_gpus(capsys):
    code, out, _ = run(capsys, ROOT / "configs" / "llama3.1-70b-ppo-4node.yaml", "--cluster", AZURE)
    assert code == 0
    assert "reference: ZeRO-3 partition over 4 rank(s)" in out
    # The whole 70B reference (131.4 GiB) would not fit one GPU: the plan says so.
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-70b-ppo-4node.yaml", "reference.num_ranks=1",
                       "reference.zero_stage=0", "--cluster", AZURE)
    assert code == 2 and err.startswith("error: plan: reference does not fit: GPU ")
    assert "needs 13" in err and "has 79.0 GiB" in err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_70b_on_one_node_exits_2_naming_the_role(capsys, tmp_path):
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-70b-ppo-4node.yaml", "--cluster", one_node(tmp_path))
    assert code == 2
    line = one_line_error(err)
    assert line.startswith("error: plan: rollout does not fit: placement group rollout/1 needs 8 GPU")
    assert "plan needs 31 GPU" in line and "cluster has 8 GPU" in line


def test_too_many_policy_ranks_names_the_policy(capsys, tmp_path):
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-8b-ppo-1node.yaml", "policy.num_ranks=16",
                       "ppo.micro_batch_size=1", "--cluster", one_node(tmp_path))
    assert code == 2
    assert one_line_error(err).startswith("error: plan: policy does not fit: placement group policy/")


def test_memory_that_does_not_fit_names_the_role_with_needed_vs_available(capsys):
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-8b-ppo-1node.yaml", "--cluster", AZURE,
                       "--node-type", "ray.worker.a100")
    assert code == 2
    line = one_line_error(err)
    assert line.startswith("error: plan: reward does not fit: GPU 7 of ray.worker.a100/0 needs 59.5 GiB, has 39.0 GiB")
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-8b-ppo-1node.yaml", "rollout.gpu_memory_utilization=0.2",
                       "--cluster", AZURE)
    assert code == 2
    assert one_line_error(err).startswith("error: plan: rollout does not fit: an engine needs 19.1 GiB per GPU")


def test_colocated_gpu_holds_every_role_on_it(capsys):
    code, out, _ = run(capsys, ROOT / "configs" / "llama3.1-8b-ppo-1node-colocated.yaml", "--cluster", AZURE)
    assert code == 0
    gpu1 = next(line for line in out.splitlines() if line.startswith("    GPU 1: "))
    assert all(f"{r}[1]" in gpu1 for r in ("rollout", "policy", "reference")) and "reward[0]" in gpu1


def test_unknown_model_is_exit_2_naming_the_key(capsys):
    code, _, err = run(capsys, ROOT / "configs" / "llama3.1-8b-ppo-1node.yaml", "model.policy=acme/llm-9b",
                       "--cluster", AZURE)
    assert code == 2 and one_line_error(err).startswith("error: model.policy: unknown model 'acme/llm-9b'")


def test_tiny_cpu_config_plans_on_this_machine(capsys):
    code, out, err = run(capsys, ROOT / "configs" / "ppo-tiny.yaml")
    assert code == 0, err
    assert "cluster: this machine" in out and "CPU: rollout[0], policy[0], critic[0]" in out
    assert "holds the reference (reference.colocate)" in out  # auto on CPU: no reference actor


# --------------------------------------------------------------------------- reference section


def test_reference_ranks_are_placed_and_validated():
    cfg = dict(placement={"gpus_per_node": 8, "mode": "colocated"}, rollout={"engines": 4},
               policy={"num_ranks": 4}, reference={"num_ranks": 4, "zero_stage": 3}, ppo={"micro_batch_size": 2})
    colo = plan_resources(build_config(cfg))
    assert colo.role("reference").slots == tuple(Slot(0, b) for b in range(4))  # rank i beside policy rank i
    dis = plan_resources(build_config({**cfg, "placement": {"gpus_per_node": 8}}))
    assert dis.role("reference").count == 4 and dis.role("reference").num_gpus == 1
    with pytest.raises(ConfigError, match="reference.offload"):
        build_config({"reference": {"offload": True}})
    with pytest.raises(ConfigError, match="reference.num_ranks: must divide the samples per step"):
        build_config({"reference": {"num_ranks": 3}})
