"""Reference policy: a frozen copy of the initial (SFT) policy, for the KL penalty.

A plain class; the driver wraps it with ``ray.remote(num_cpus=..., num_gpus=...)``. It holds
the whole model on one device (no DeepSpeed: there is no optimizer state to shard). Runs
the same on one CPU machine and on a GPU node.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlhf.actors.modeling import load_causal_lm, sequence_logprobs
from rlhf.orchestrator.experience import SequenceBatch


class ReferenceModel:
    """Log-probs of sequences under the frozen initial policy."""

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8,
                 num_threads: int = 1, chunk_size: int = 1024) -> None:
        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.micro_batch_size, self.chunk_size = micro_batch_size, chunk_size

    @torch.no_grad()
    def compute_logprobs(self, batch: SequenceBatch, temperature: float = 1.0) -> Tensor:
        """[B, T] -> log-probs [B, T-1] float32 on CPU of softmax(logits / temperature),
        0 outside action_mask (the learners' convention)."""
        out = torch.zeros(batch.action_mask.shape, dtype=torch.float32)
        for s in range(0, len(batch), self.micro_batch_size):
            sl = slice(s, s + self.micro_batch_size)
            mb = batch.select(sl).trimmed()
            mb = SequenceBatch(mb.input_ids.to(self.device), mb.attention_mask.to(self.device), mb.action_mask)
            out[sl, : mb.action_mask.shape[1]] = sequence_logprobs(self.model, mb, temperature,
                                                                   self.chunk_size).float().cpu()
        return torch.where(batch.action_mask.bool(), out, torch.zeros_like(out))
