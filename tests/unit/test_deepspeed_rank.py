"""The one DeepSpeed config builder (rlhf.actors.deepspeed_rank.ds_config) gives each user
exactly the config its own copy built before the merge (learner, ZeRO-3 reference, RM),
and partition_while_loading is a no-op below ZeRO-3. Pure dicts; no process group.

Run: .venv/bin/pytest tests/unit/test_deepspeed_rank.py -q
"""
from __future__ import annotations

import torch

from rlhf.actors.deepspeed_rank import AdamW, ds_config, partition_while_loading

COMMON = {"gradient_accumulation_steps": 1, "steps_per_print": 10**9, "wall_clock_breakdown": False}
TORCH_ADAMW = {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                           "torch_adam": True}}


def test_learner_config_with_offload():
    got = ds_config(zero_stage=3, micro_batch_size=4, dtype="bfloat16", adamw=AdamW(lr=1e-5), grad_clip=None,
                    offload=True, own_accumulation=True)
    pin = torch.cuda.is_available()
    assert got == {**COMMON, "train_micro_batch_size_per_gpu": 4, "managed_gradient_accumulation": False,
                   "gradient_clipping": 0.0, "bf16": {"enabled": True}, "optimizer": TORCH_ADAMW,
                   "zero_force_ds_cpu_optimizer": False,
                   "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": pin},
                                         "offload_param": {"device": "cpu", "pin_memory": pin}}}


def test_reference_config_has_no_optimizer():
    got = ds_config(zero_stage=3, micro_batch_size=8, dtype="float16", offload=True)
    assert got == {**COMMON, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": False},
                   "fp16": {"enabled": True}, "zero_optimization": {
                       "stage": 3, "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}}


def test_reward_model_config():
    got = ds_config(zero_stage=2, micro_batch_size=3, dtype="float32", adamw=AdamW(lr=1e-5), grad_clip=1.0)
    assert got == {**COMMON, "train_micro_batch_size_per_gpu": 3, "gradient_clipping": 1.0,
                   "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}, "optimizer": TORCH_ADAMW,
                   "zero_force_ds_cpu_optimizer": False}


def test_partition_is_a_no_op_below_zero3():
    module = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in module.parameters()]
    partition_while_loading(module, ds_config(zero_stage=2, micro_batch_size=1, dtype="float32"))
    assert not any(hasattr(p, "ds_tensor") for p in module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
