"""Cluster descriptions for `rlhf plan`: which nodes exist, with how many GPUs of what size.

Three sources, all turned into a list of `Node`s:

1. Ray's cluster YAML (the file `ray up` takes, e.g. deploy/azure/cluster.yaml): every
   entry of `available_node_types` contributes `max_workers` nodes (default: 0 for the
   head type, the global cap for others, as Ray fills them in), plus the head itself, with
   the CPU, GPU and `memory` (bytes; Ray's heap, taken as the RAM for offloaded states) of
   its `resources`; workers of the planned types are capped by the top-level `max_workers`.
   Ray's schema has no field for GPU memory, so it comes from, in order:
     - the node type's label `gpu-memory-gib` (e.g. `labels: {gpu-memory-gib: "80"}`),
     - the VM size in `node_config.azure_arm_parameters.vmSize` (table below),
     - a resource `accelerator_type:<NAME>` with a Ray accelerator name (table below).
2. A simple description of our own:

       nodes:
         - name: gpu          # any label
           count: 4           # nodes of this kind
           gpus: 8
           gpu_memory_gib: 80
           cpus: 96           # optional (default 8 per GPU, at least 1)
           memory_gib: 1900   # optional CPU RAM (checked against offloaded states)

3. No file: this machine (CPU count, RAM, and CUDA GPUs if torch sees any).

Problems are `BadInput` naming the file and the key (exit 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf.orchestrator.errors import BadInput

GIB = 1024**3

# Usable GPU memory in GiB (about what torch.cuda reports as total_memory, rounded down).
GPU_MEMORY_GIB = {"H100-80GB": 79.0, "H100-NVL": 93.0, "H200": 139.0, "A100-40GB": 39.0,
                  "A100-80GB": 79.0, "V100-16GB": 15.7, "V100-32GB": 31.7, "T4": 14.5, "A10": 22.0,
                  "L4": 22.0}

# Azure VM size -> (GPUs, GPU kind, vCPUs, RAM GiB), from Azure's size pages.
AZURE_VM_SIZES = {
    "Standard_ND96isr_H100_v5": (8, "H100-80GB", 96, 1900),
    "Standard_ND96isr_H200_v5": (8, "H200", 96, 1850),
    "Standard_ND96asr_v4": (8, "A100-40GB", 96, 900),
    "Standard_ND96amsr_A100_v4": (8, "A100-80GB", 96, 1900),
    "Standard_NC24ads_A100_v4": (1, "A100-80GB", 24, 220),
    "Standard_NC48ads_A100_v4": (2, "A100-80GB", 48, 440),
    "Standard_NC96ads_A100_v4": (4, "A100-80GB", 96, 880),
    "Standard_NC40ads_H100_v5": (1, "H100-NVL", 40, 320),
    "Standard_NC80adis_H100_v5": (2, "H100-NVL", 80, 640),
    "Standard_ND40rs_v2": (8, "V100-32GB", 40, 672),
    "Standard_NC6s_v3": (1, "V100-16GB", 6, 112),
    "Standard_NC24s_v3": (4, "V100-16GB", 24, 448),
    "Standard_NC4as_T4_v3": (1, "T4", 4, 28),
}

# Ray's accelerator names (resource "accelerator_type:<name>") -> GPU kind.
RAY_ACCELERATORS = {"H100": "H100-80GB", "H200": "H200", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB",
                    "V100": "V100-16GB", "T4": "T4", "A10G": "A10", "L4": "L4"}


@dataclass(frozen=True)
class Node:
    """One machine of the cluster."""

    name: str                 # e.g. "ray.worker.h100/2", "local"
    kind: str                 # node type (Ray) or entry name (simple format)
    gpus: int
    gpu_memory_gib: float     # per GPU; 0 without GPUs
    cpus: float
    memory_gib: float | None  # CPU RAM; None = unknown (not checked)
    gpu_label: str = ""       # e.g. "Standard_ND96isr_H100_v5, H100-80GB"
    is_head: bool = False     # the Ray head (not counted against max_workers)


@dataclass(frozen=True)
class Cluster:
    source: str               # the file, or "this machine"
    nodes: tuple[Node, ...]
    notes: tuple[str, ...] = ()   # printed under the plan (e.g. node types left out)
    cpus_follow_plan: bool = False  # this machine: local Ray gets as many logical CPUs as needed
    max_workers: int | None = None  # Ray YAML: cap on worker nodes of all types together

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(n.kind for n in self.nodes))


class _SimpleNode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("node", description="label of this kind of node")
    count: int = Field(1, ge=0, description="nodes of this kind")
    gpus: int = Field(0, ge=0, description="GPUs per node")
    gpu_memory_gib: float = Field(0.0, ge=0, description="memory per GPU in GiB")
    cpus: float | None = Field(None, gt=0, description="CPUs per node (default 8 per GPU, at least 1)")
    memory_gib: float | None = Field(None, gt=0, description="CPU RAM per node in GiB")


class _SimpleCluster(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: list[_SimpleNode]


def load_cluster(path: str | Path | None, node_type: str | None = None) -> Cluster:
    """The cluster in `path` (Ray cluster YAML or the simple format), or this machine.

    `node_type`: plan on this node type only (plus CPU-only nodes). Without it, a Ray YAML
    with several GPU node types is planned on the type with the most GPU memory per GPU:
    Ray does not know GPU memory and could put a group on any type, so a run meant for
    one type should start only nodes of that type."""
    if path is None:
        return _local_machine()
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--cluster: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BadInput(f"--cluster {path}: invalid YAML: {err}") from None
    if isinstance(data, dict) and "available_node_types" in data:
        cluster = _from_ray_yaml(data, str(path))
    elif isinstance(data, dict) and "nodes" in data:
        cluster = _from_simple(data, str(path))
    else:
        raise BadInput(f"--cluster {path}: expected a Ray cluster YAML (available_node_types) "
                       f"or a node list (nodes: [{{count, gpus, gpu_memory_gib}}])")
    return _choose_gpu_kind(cluster, node_type)


def _from_simple(data: dict, source: str) -> Cluster:
    try:
        spec = _SimpleCluster.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise BadInput(f"--cluster {source}: {key}: {first['msg']}") from None
    nodes = []
    for entry in spec.nodes:
        if entry.gpus and not entry.gpu_memory_gib:
            raise BadInput(f"--cluster {source}: node '{entry.name}' has GPUs but no gpu_memory_gib")
        cpus = entry.cpus if entry.cpus is not None else max(1, 8 * entry.gpus)
        nodes += [Node(f"{entry.name}/{i}", entry.name, entry.gpus, entry.gpu_memory_gib, cpus, entry.memory_gib,
                       f"{entry.gpu_memory_gib:g} GiB" if entry.gpus else "") for i in range(entry.count)]
    return Cluster(source, tuple(nodes))


def _from_ray_yaml(data: dict, source: str) -> Cluster:
    types = data.get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        raise BadInput(f"--cluster {source}: available_node_types must be a non-empty mapping")
    head = data.get("head_node_type")
    if head is not None and head not in types:
        raise BadInput(f"--cluster {source}: head_node_type '{head}' is not in available_node_types")
    cap = int(data.get("max_workers", 2))  # Ray's default cap on workers (all types together)
    nodes = []
    for name, spec in types.items():
        if not isinstance(spec, dict):
            raise BadInput(f"--cluster {source}: available_node_types.{name} must be a mapping")
        res = spec.get("resources") or {}
        gpus = int(res.get("GPU", 0))
        memory = res.get("memory")
        vm = ((spec.get("node_config") or {}).get("azure_arm_parameters") or {}).get("vmSize")
        gpu_gib, label = _gpu_memory(name, spec, res, vm, gpus, source)
        ram = memory / GIB if memory else (AZURE_VM_SIZES[vm][3] if vm in AZURE_VM_SIZES else None)
        cpus = float(res["CPU"]) if "CPU" in res else float(AZURE_VM_SIZES[vm][2] if vm in AZURE_VM_SIZES else 1)
        if name == head:
            nodes.append(Node(f"{name}/head", name, gpus, gpu_gib, cpus, ram, label, is_head=True))
        # Ray's defaults (autoscaler fill_node_type_min_max_workers): the head type adds no
        # workers, other types up to the global cap.
        count = max(0, min(int(spec.get("max_workers", 0 if name == head else cap)), cap))
        nodes += [Node(f"{name}/{i}", name, gpus, gpu_gib, cpus, ram, label) for i in range(count)]
    return Cluster(source, tuple(nodes), max_workers=cap)


def _gpu_memory(name: str, spec: dict, res: dict, vm: str | None, gpus: int, source: str) -> tuple[float, str]:
    """(GiB per GPU, label) of a Ray node type: label gpu-memory-gib, Azure VM size, or accelerator_type."""
    if not gpus:
        return 0.0, ""
    labels = spec.get("labels") or {}
    if "gpu-memory-gib" in labels:
        try:
            gib = float(labels["gpu-memory-gib"])
        except ValueError:
            raise BadInput(f"--cluster {source}: available_node_types.{name}.labels.gpu-memory-gib "
                           f"must be a number, got {labels['gpu-memory-gib']!r}") from None
        kind = labels.get("gpu-type")
        return gib, f"{kind + ', ' if kind else ''}{gib:g} GiB from label gpu-memory-gib"
    if vm in AZURE_VM_SIZES:
        n, kind, _, _ = AZURE_VM_SIZES[vm]
        if n != gpus:
            raise BadInput(f"--cluster {source}: available_node_types.{name}.resources.GPU is {gpus}, "
                           f"but a {vm} has {n} GPUs")
        return GPU_MEMORY_GIB[kind], f"{vm}, {kind}"
    for key in res:
        if key.startswith("accelerator_type:") and key.split(":", 1)[1] in RAY_ACCELERATORS:
            kind = RAY_ACCELERATORS[key.split(":", 1)[1]]
            return GPU_MEMORY_GIB[kind], kind
    raise BadInput(f"--cluster {source}: available_node_types.{name}: GPU memory unknown (vmSize {vm!r}); "
                   f"add labels: {{gpu-memory-gib: \"80\"}} to the node type, or use a known vmSize "
                   f"({', '.join(AZURE_VM_SIZES)})")


def _choose_gpu_kind(cluster: Cluster, node_type: str | None) -> Cluster:
    gpu_kinds = list(dict.fromkeys(n.kind for n in cluster.nodes if n.gpus))
    if node_type is not None:
        if node_type not in cluster.kinds():
            raise BadInput(f"--node-type: no node type '{node_type}' in {cluster.source} "
                           f"(types: {', '.join(cluster.kinds())})")
        keep, notes = node_type, (f"planned on node type {node_type} only (--node-type)",)
    elif len(gpu_kinds) > 1:
        memory = {n.kind: n.gpu_memory_gib for n in cluster.nodes if n.gpus}
        keep = max(gpu_kinds, key=lambda k: memory[k])  # max keeps the first of equals
        others = ", ".join(k for k in gpu_kinds if k != keep)
        notes = (f"planned on GPU node type {keep} (most memory per GPU); also in the file: {others}. "
                 f"Ray does not know GPU memory: start only {keep} workers for this run, "
                 f"or plan another type with --node-type",)
    else:
        keep, notes = None, ()
    nodes = [n for n in cluster.nodes if keep is None or n.kind == keep or not n.gpus]
    if cluster.max_workers is not None:  # the autoscaler's cap, applied to the types planned on
        workers = [n for n in nodes if not n.is_head][: cluster.max_workers]
        nodes = [n for n in nodes if n.is_head or n in workers]
    return replace(cluster, nodes=tuple(nodes), notes=cluster.notes + notes)


def _local_machine() -> Cluster:
    """This machine: its CPUs and RAM, and its CUDA GPUs when torch sees any."""
    gpus, gib, label = 0, 0.0, ""
    if not (Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()):
        return _local(gpus, gib, label)  # no NVIDIA driver: skip the seconds torch takes to import
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            gib, label = props.total_memory / GIB, props.name
    except ImportError:
        pass
    return _local(gpus, gib, label)


def _local(gpus: int, gib: float, label: str) -> Cluster:
    import psutil

    node = Node("local", "this machine", gpus, gib, float(os.cpu_count() or 1),
                psutil.virtual_memory().total / GIB, label)
    return Cluster("this machine", (node,), ("logical CPUs: an embedded local Ray gets as many as the plan "
                                              "needs (orchestrator/ppo/launch.py start_ray)",), cpus_follow_plan=True)
