"""Typed batches that cross actor boundaries (DESIGN.md: "a typed dataclass of tensors").

Layout conventions, used everywhere:
- A sequence is prompt tokens then response tokens, right-padded to T with the pad id.
- Per-token tensors ("token" below) have shape [B, T-1] and are aligned with the *targets*
  input_ids[:, 1:]: position t holds the log-prob / value / reward / advantage of emitting
  token t+1 given tokens <= t. `action_mask[b, t] = 1` iff token t+1 is a response token
  the policy generated (the stop token included; a tool's inserted tokens excluded, so the
  mask can have gaps inside a response).
- Samples of one prompt are consecutive: row i belongs to prompt group i // n.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

from rlhf.orchestrator import wire

# Every process that sends or receives these types imports this module: their tensors (and the
# log-probs and values that come back) cross Ray as numpy arrays, several times faster (wire.py).
wire.install()


@dataclass
class Samples:
    """What rollout engines return: token ids, no padding, one entry per sample.

    With tools (rlhf.actors.tools) a response holds the policy's ids and the ids the system
    inserted, as they happened; `response_mask` tells them apart and `response_logprobs` covers
    the policy's ids only. Without tools `response_mask` is [] (every response id is the policy's).
    """

    prompt_ids: list[list[int]]         # B lists of prompt token ids
    response_ids: list[list[int]]       # B lists of response ids (stop token included if generated)
    response_logprobs: list[list[float]]  # B lists, the sampler's log-prob of each POLICY id (len = sum(mask))
    finished: list[bool]                # B: ended on a stop token (not cut by max_new_tokens)
    prompt_index: list[int]             # B: index of the prompt in the step's prompt list
    response_mask: list[list[int]] = field(default_factory=list)  # [] or B lists: 1 policy id, 0 inserted

    def __len__(self) -> int:
        return len(self.response_ids)

    def policy_mask(self, i: int) -> list[int]:
        """Sample i's response mask (all ones when the samples carry none)."""
        return self.response_mask[i] if self.response_mask else [1] * len(self.response_ids[i])

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        """One Samples of all parts in order; parts with and without masks mix (then all get one)."""
        lists = [f.name for f in fields(Samples) if f.name != "response_mask"]
        out = Samples(*[sum((getattr(p, name) for p in parts), []) for name in lists])
        if any(p.response_mask for p in parts):
            out.response_mask = [p.policy_mask(i) for p in parts for i in range(len(p))]
        return out


@dataclass
class SequenceBatch:
    """Padded token ids for a model forward pass."""

    input_ids: Tensor       # [B, T] long, prompt + response, right-padded
    attention_mask: Tensor  # [B, T] long, 1 on real tokens
    action_mask: Tensor     # [B, T-1] float, 1 where the target token is a response token

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | Tensor) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[index], self.attention_mask[index], self.action_mask[index])

    def split(self, n: int) -> list["SequenceBatch"]:
        """`n` equal consecutive parts (n must divide B): one per data-parallel rank."""
        return [self.select(s) for s in _even_slices(len(self), n)]

    def trimmed(self) -> "SequenceBatch":
        """Drops trailing all-padding columns (shorter forward passes for a micro-batch)."""
        width = int(self.attention_mask.sum(1).max())
        return SequenceBatch(self.input_ids[:, :width], self.attention_mask[:, :width],
                             self.action_mask[:, : width - 1])


def to_sequence_batch(samples: Samples, pad_id: int) -> SequenceBatch:
    """Pads prompt+response ids into a `SequenceBatch`; the action mask is 0 on inserted
    (response_mask 0) tokens: they are context, not actions of the policy."""
    lengths = [len(p) + len(r) for p, r in zip(samples.prompt_ids, samples.response_ids)]
    T = max(lengths)
    ids, actions = [], []
    for i, (p, r) in enumerate(zip(samples.prompt_ids, samples.response_ids)):
        ids.append(p + r + [pad_id] * (T - len(p) - len(r)))  # rows as lists: one tensor built at the end
        actions.append([0] * (len(p) - 1) + samples.policy_mask(i) + [0] * (T - len(p) - len(r)))
    attention_mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return SequenceBatch(torch.tensor(ids, dtype=torch.long), attention_mask, torch.tensor(actions, dtype=torch.float32))


def dialogue_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Pads (token ids, loss mask) pairs of demonstration dialogues into a `SequenceBatch`;
    the action mask marks targets whose loss mask is 1 (assistant tokens, for SFT and ptx)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.float32)
    return SequenceBatch(input_ids, attention_mask, loss_mask[:, 1:])


@dataclass
class Experience:
    """One step's training data for the policy and critic learners (token tensors [B, T-1]).
    A batch sent to one role carries only the fields that role reads (`keeping`); the rest are None."""

    sequences: SequenceBatch
    old_logp: Optional[Tensor]    # [B, T-1] policy log-probs at generation time (learner's forward)
    ref_logp: Optional[Tensor]    # [B, T-1] reference (SFT) policy log-probs
    advantages: Optional[Tensor]  # [B, T-1] zero outside action_mask
    returns: Optional[Tensor]     # [B, T-1] critic targets (zero outside action_mask)
    old_values: Optional[Tensor] = None  # [B, T-1] critic values at generation time; None without critic

    def __len__(self) -> int:
        return len(self.sequences)

    def select(self, index: slice | Tensor) -> "Experience":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Experience(self.sequences.select(index), pick(self.old_logp), pick(self.ref_logp),
                          pick(self.advantages), pick(self.returns), pick(self.old_values))

    def keeping(self, *names: str) -> "Experience":
        """The same rows with only the sequences and the token tensors `names`: the policy's
        update reads old_logp and advantages, the critic's old_values and returns, so a
        mini-batch sent inline to one role pickles at about half the bytes."""
        return replace(self, **{f.name: None for f in fields(self) if f.name != "sequences" and f.name not in names})

    def split(self, n: int) -> list["Experience"]:
        """`n` equal consecutive parts (n must divide B): one per data-parallel rank."""
        return [self.select(s) for s in _even_slices(len(self), n)]

    def trimmed(self) -> "Experience":
        """Drops trailing all-padding columns (shorter forward passes for a micro-batch)."""
        seq = self.sequences.trimmed()
        width = seq.input_ids.shape[1]
        cut = lambda t: None if t is None else t[:, : width - 1]  # noqa: E731
        return replace(self, sequences=seq, old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp),
                       advantages=cut(self.advantages), returns=cut(self.returns), old_values=cut(self.old_values))


def _even_slices(total: int, n: int) -> list[slice]:
    if n <= 0 or total % n:
        raise ValueError(f"cannot split {total} rows into {n} equal parts")
    size = total // n
    return [slice(i * size, (i + 1) * size) for i in range(n)]
