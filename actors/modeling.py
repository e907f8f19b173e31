"""Model pieces shared by the learners and the reference actor (pure torch/transformers).

- `load_causal_lm`: a Hugging Face causal LM from a folder (or hub name on a cluster).
- `sequence_logprobs`: per-token log-probs [B, T-1] (and entropy) of a `SequenceBatch`,
  from the backbone's last hidden state and the output embedding through
  `rlhf.kernels.token_logprobs`, so the [B, T, V] logits tensor is never built.
- `ValueModel`: the PPO critic, a causal-LM backbone plus a scalar value head.

Layout (rlhf.orchestrator.experience): position t of a [B, T-1] tensor belongs to the
target token t+1, i.e. to the state "tokens <= t". Log-probs there are log p(x_{t+1} | x_<=t);
values there are V(x_<=t), the value of the state the action x_{t+1} is taken from.

Run on one CPU machine or a cluster alike; nothing here knows about Ray or DeepSpeed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from rlhf.kernels import token_logprobs
from rlhf.orchestrator.experience import SequenceBatch

# File that holds a value/reward head next to a backbone folder (see ValueModel).
VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "float32" / torch.bfloat16 ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32' or 'bfloat16'")
    return resolved


def load_causal_lm(path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """A causal LM from a Hugging Face folder, in `dtype`, in train mode (caller picks eval)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))


def backbone_of(model: PreTrainedModel) -> nn.Module:
    """The decoder stack without the LM head (e.g. `Qwen2ForCausalLM.model`)."""
    return model.base_model


def last_hidden_state(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T] ids -> [B, T, H]. Positions are 0..T-1 (right padding: real tokens come first,
    exactly the positions the rollout engine used), so no position ids are passed."""
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def sequence_logprobs(
    model: PreTrainedModel,
    batch: SequenceBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of every target token under softmax(logits / temperature).

    batch.input_ids [B, T]. Returns logp [B, T-1] float32 (and entropy [B, T-1] when
    `with_entropy`); position t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).
    Every position is computed; callers mask with batch.action_mask. Differentiable.
    Tied embeddings need nothing special: get_output_embeddings().weight is then the input
    embedding matrix itself.
    """
    hidden = last_hidden_state(backbone_of(model), batch.input_ids, batch.attention_mask)
    head = model.get_output_embeddings()
    return token_logprobs(hidden[:, :-1], head.weight, batch.input_ids[:, 1:], bias=head.bias,
                          temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)


class ValueModel(nn.Module):
    """Critic: causal-LM backbone + Linear(hidden, 1) value head.

    `values(batch)[b, t]` is V(state after token t), aligned with the [B, T-1] action layout.
    """

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        if value_head is None:
            value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
            # Zero init: the critic starts out predicting 0 everywhere, so the first value
            # targets are not fighting a random head (initialised from the policy).
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> "ValueModel":
        """Backbone from a causal-LM (or backbone-only) folder; the value head from
        `<path>/value_head.safetensors` when the folder has one, else zero-initialised.

        Hook for the reward model: a reward model saved with `ValueModel.save_pretrained`
        (backbone + value_head.safetensors holding `weight` [1, H] and `bias` [1]) initialises
        the critic from the reward model, as InstructGPT does, with no change here.
        """
        dtype = resolve_dtype(dtype)
        # AutoModel on a *ForCausalLM folder loads the backbone and drops the LM head.
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype)
        model = cls(backbone)
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.is_file():
            state = load_file(str(head_file))
            model.value_head.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return model

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Writes the backbone as an HF folder plus value_head.safetensors (what
        `from_pretrained` reads back). `state_dict` (ValueModel names) overrides the live
        weights, e.g. ZeRO-3 gathered ones."""
        state = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(str(path), state_dict=backbone_state)
        head = {k.removeprefix("value_head."): v.detach().cpu().contiguous()
                for k, v in state.items() if k.startswith("value_head.")}
        save_file(head, str(Path(path) / VALUE_HEAD_FILE))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] -> values [B, T-1] float32 (the last position has no action, so it is cut)."""
        hidden = last_hidden_state(self.backbone, input_ids, attention_mask)
        return self.value_head(hidden[:, :-1]).squeeze(-1).float()

    def values(self, batch: SequenceBatch) -> Tensor:
        """batch [B, T] -> [B, T-1]: position t is V(input_ids[:, :t+1])."""
        return self(batch.input_ids, batch.attention_mask)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)
