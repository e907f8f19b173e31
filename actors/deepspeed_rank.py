"""The one DeepSpeed set-up of every rank: config, process group, partition-while-loading.

Used by the PPO learners (rlhf.actors.learner), the ZeRO-3 reference (rlhf.actors.reference),
and the SFT and reward-model Ray Train workers (rlhf.actors.sft_worker, rlhf.actors.rm_worker):

    host, port = master_address()                       # rank 0, our own rendezvous
    join_process_group(host, port, rank, world, "gloo")  # every rank (Ray actors)
    join_train_group()                                   # or: inside a Ray Train worker
    config = ds_config(zero_stage=3, micro_batch_size=4, dtype="float32", adamw=AdamW(lr=1e-5))
    partition_while_loading(module, config)              # ZeRO-3: shard before initialize
    engine, *_ = deepspeed.initialize(model=module, config=config, ...)

Why partition while loading: `deepspeed.initialize` moves the whole module onto the device
before ZeRO-3 partitions it, so a model bigger than one GPU would not load. `zero.Init(
module=...)` moves it parameter by parameter and keeps only this rank's shard; the CPU holds
one full copy per rank while loading.

Runs on one CPU machine (gloo) and on GPU clusters (nccl) alike.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.actors.modeling import resolve_dtype


@dataclass(frozen=True)
class AdamW:
    """torch AdamW as DeepSpeed's optimizer (decay per parameter group, see param_groups)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


def ds_config(*, zero_stage: int, micro_batch_size: int, dtype: str, adamw: AdamW | None = None,
              grad_clip: float | None = None, offload: bool = False, own_accumulation: bool = False) -> dict:
    """A DeepSpeed config. `adamw` None: an inference engine (ZeRO-3 partition + gather hooks,
    no optimizer). `offload`: optimizer states (when training) and ZeRO-3 parameters on CPU.
    `own_accumulation`: backward() per micro-batch only accumulates and the caller's step()
    is the boundary (the learners), instead of DeepSpeed counting micro-batches."""
    zero: dict = {"stage": zero_stage}
    if offload:
        pin = torch.cuda.is_available()
        if adamw is not None:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_dtype(dtype) == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if own_accumulation:
        config["managed_gradient_accumulation"] = False
    if adamw is None:
        # Inference holds fp16 weights as they are; training keeps fp16 off (no loss scaler set up).
        config["fp16"] = {"enabled": resolve_dtype(dtype) == torch.float16}
        return config
    config.update({
        "gradient_clipping": grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": adamw.lr, "betas": list(adamw.betas), "eps": adamw.eps,
            "weight_decay": adamw.weight_decay, "torch_adam": True}},
        # Keep torch's AdamW under ZeRO-Offload too (DeepSpeedCPUAdam needs a C++ build).
        "zero_force_ds_cpu_optimizer": False,
    })
    return config


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def master_address() -> tuple[str, int]:
    """(node IP, free port) for a rendezvous; ask rank 0 only."""
    host = _node_ip()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def join_process_group(host: str, port: int, rank: int, world_size: int, backend: str) -> None:
    """Joins the ranks' torch.distributed group through DeepSpeed (every rank calls)."""
    import deepspeed

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    # Ray gives each actor its own GPU as device 0 (CUDA_VISIBLE_DEVICES), so LOCAL_RANK=0.
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def join_train_group() -> tuple[int, int]:
    """Inside a Ray Train worker: wraps the process group Ray Train made (no rendezvous of
    our own) and returns (rank, world size). Ray Train has set RANK/LOCAL_RANK; DeepSpeed
    places its engine on LOCAL_RANK, so zero.Init must use that device as well."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                               verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def partition_while_loading(module: nn.Module, config: dict) -> None:
    """Under ZeRO-3, partitions the loaded `module` in place before deepspeed.initialize
    (which would otherwise move it to the device whole); a no-op for stages 0-2."""
    if config["zero_optimization"]["stage"] != 3:
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.zero.Init(module=module, config_dict_or_path=config)
    for buf in module.buffers():  # zero.Init moves parameters only (e.g. rotary inv_freq stays)
        buf.data = buf.data.to(get_accelerator().current_device_name())


def register_output_head(wrapper: nn.Module, model: nn.Module) -> None:
    """ZeRO-3: the output embedding is used outside its own module's forward (token log-probs
    from the last hidden state), so DeepSpeed must gather it for the whole `wrapper` forward."""
    import deepspeed

    head = model.get_output_embeddings()
    for p in (head.weight, head.bias):
        if p is not None:
            deepspeed.zero.register_external_parameter(wrapper, p)


def equal_micro_slices(n: int, micro_batch_size: int, world_size: int, device, who: str) -> list[slice]:
    """Micro-batch slices of n rows. With several ranks, checks (one all-reduce) that every
    rank makes the same number of passes: a mismatch would otherwise hang in a collective."""
    slices = [slice(s, min(s + micro_batch_size, n)) for s in range(0, n, micro_batch_size)]
    if world_size > 1:
        counts = torch.tensor([len(slices), -len(slices)], dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(f"{who}: ranks got different numbers of micro-batches "
                             f"({-int(counts[1])}..{int(counts[0])}); send every rank an equal slice")
    return slices
