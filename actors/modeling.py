"""Model pieces shared by the learners and the reference actor (pure torch/transformers).

- `load_causal_lm`: a Hugging Face causal LM from a folder (or hub name on a cluster).
- `sequence_logprobs`: per-token log-probs [B, T-1] (and entropy) of a `SequenceBatch`,
  from the backbone's last hidden state and the output embedding through
  a token log-prob kernel (`rlhf.kernels.select_backend`), so the [B, T, V] logits tensor
  is never built.
- `ValueModel`: the PPO critic, a causal-LM backbone plus a scalar value head.
- Packing (`packing=True` on `load_causal_lm` / `ValueModel`): the forward puts a batch's
  sequences back to back in one row with position ids restarting per sequence, so no
  compute goes to padding; outputs come back in the padded [B, T-1] layout (0 where there
  is no next real token). Attention keeps sequences apart: on CPU transformers' sdpa/eager
  build a block-diagonal causal mask from the position ids; on CUDA `rlhf_varlen`
  (torch's varlen flash kernel, rlhf.kernels.varlen_attention) or flash_attention_2
  use the cumulative sequence lengths, and attention costs sum L_i^2, not M^2.
- Shared prompts (packing on CPU, given the prompt lengths): rows of a micro-batch that start
  with the same prompt (the n samples of one prompt in PPO/GRPO) share one copy of it in the
  packed row; each reply attends to that copy and to itself through a 4D mask, with its
  positions continuing after the prompt. The same function of the weights, computed once per
  prompt instead of n times (exact: a prompt's hidden states see the prompt only).
- Token log-prob backend: `select_backend(default_backend(), device)`, i.e. the fused
  Triton kernel on CUDA and the chunked reference on CPU ($RLHF_LOGPROB_BACKEND forces one).

Layout (rlhf.orchestrator.experience): position t of a [B, T-1] tensor belongs to the
target token t+1, i.e. to the state "tokens <= t". Log-probs there are log p(x_{t+1} | x_<=t);
values there are V(x_<=t), the value of the state the action x_{t+1} is taken from.

Run on one CPU machine or a cluster alike; nothing here knows about Ray or DeepSpeed.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from rlhf.kernels import default_backend, select_backend
from rlhf.orchestrator.experience import SequenceBatch

_log = logging.getLogger(__name__)

# File that holds a value/reward head next to a backbone folder (see ValueModel).
VALUE_HEAD_FILE = "value_head.safetensors"
# Attribute on a loaded model saying whether its forwards pack sequences (load_causal_lm).
PACKING_ATTR = "rlhf_packing"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "float32" / torch.bfloat16 ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32' or 'bfloat16'")
    return resolved


def load_causal_lm(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   packing: bool = False) -> PreTrainedModel:
    """A causal LM from a Hugging Face folder, in `dtype`, in train mode (caller picks eval).
    `packing`: `sequence_logprobs` packs this model's batches (see the module docstring)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    setattr(model, PACKING_ATTR, bool(packing))
    return model


def backbone_of(model: PreTrainedModel) -> nn.Module:
    """The decoder stack without the LM head (e.g. `Qwen2ForCausalLM.model`)."""
    return model.base_model


def last_hidden_state(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T] ids -> [B, T, H]. Positions are 0..T-1 (right padding: real tokens come first,
    exactly the positions the rollout engine used), so no position ids are passed."""
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@dataclass
class PackedBatch:
    """A padded [B, T] batch as one row of its real tokens (M of them), and the way back.

    "Pairs" are the positions (b, t) of the [B, T-1] layout whose target t+1 is a real
    token too: those are the only positions a packed forward computes.
    """

    input_ids: Tensor      # [1, M] every row's real tokens, back to back
    position_ids: Tensor   # [1, M] 0..L_b-1 within each sequence
    cu_seqlens: Tensor     # [B+1] int32, cumulative sequence lengths (varlen attention)
    max_len: int           # longest sequence
    pairs: Tensor          # [B, T-1] bool: real token at t and at t+1
    source: Tensor         # [K] index into the M packed tokens of each pair's token t
    targets: Tensor        # [K] input_ids[b, t+1] of each pair
    attend: Tensor | None = None  # [M, M] bool, shared prompts: query i may attend to key j

    def attention_kwargs(self, attn_implementation: str | None = None) -> dict:
        """What a transformers backbone takes for a packed forward: position ids (sdpa/eager
        derive a block-diagonal mask from them) and the varlen arguments (flash/rlhf_varlen),
        or with shared prompts the 4D mask (bool for sdpa, additive for eager)."""
        if self.attend is not None:
            mask = self.attend[None, None]
            if attn_implementation == "eager":
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            return dict(position_ids=self.position_ids, attention_mask=mask)
        return dict(position_ids=self.position_ids, cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_len, max_length_k=self.max_len, attention_mask=None)

    def unpack(self, per_pair: Tensor) -> Tensor:
        """[K, ...] values of the pairs -> [B, T-1, ...], 0 elsewhere (differentiable)."""
        out = per_pair.new_zeros((*self.pairs.shape, *per_pair.shape[1:]))
        out[self.pairs] = per_pair
        return out


def prompt_lengths(batch: SequenceBatch, actions: Tensor | None = None) -> Tensor:
    """[B] tokens before each row's reply: the position of its first action target in
    `actions` [B, T-1] (default batch.action_mask); a row with no action counts whole."""
    acts = (batch.action_mask if actions is None else actions).bool()
    first = acts.long().argmax(1) + 1  # argmax returns the first of equal maxima
    return torch.where(acts.any(1), first, batch.attention_mask.sum(1))


def pack_batch(input_ids: Tensor, attention_mask: Tensor, prompt_lens: Tensor | None = None) -> PackedBatch:
    """[B, T] ids and mask -> PackedBatch. Positions count real tokens only, so a
    right-padded row gets 0..L-1, exactly the positions of the padded forward. With
    `prompt_lens` [B] (CPU: dense-mask attention), rows that begin with the same prompt share
    one copy of it (the module docstring); without any such rows the layout is the plain one."""
    groups = None
    if prompt_lens is not None and input_ids.device.type != "cuda":
        groups = _prompt_groups(input_ids, attention_mask.sum(1), prompt_lens)
    if groups is not None:
        return _pack_shared(input_ids, attention_mask, groups)
    real = attention_mask.bool()
    flat = real.reshape(-1)
    index = flat.long().cumsum(0).reshape(real.shape) - 1  # packed index of each real (b, t)
    pairs = real[:, :-1] & real[:, 1:]
    lengths = real.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(
        input_ids=input_ids.reshape(-1)[flat][None],
        position_ids=(real.long().cumsum(1) - 1).reshape(-1)[flat][None],
        cu_seqlens=cu, max_len=int(lengths.max()) if len(lengths) else 0,
        pairs=pairs, source=index[:, :-1][pairs], targets=input_ids[:, 1:][pairs])


def _prompt_groups(input_ids: Tensor, lengths: Tensor, prompt_lens: Tensor) -> list[tuple[int, list[int]]] | None:
    """[(prompt length, rows)] of rows with identical prompts, in order of first appearance;
    None when no two rows share one of at least 2 tokens (a common first token alone, as in
    a forward given no reply positions, is not worth the 4D mask)."""
    groups: dict[tuple, list[int]] = {}
    for b, (length, p) in enumerate(zip(lengths.tolist(), prompt_lens.tolist())):
        p = min(int(p), int(length))
        groups.setdefault((p, *input_ids[b, :p].tolist()) if p >= 2 else (p, -1 - b), []).append(b)
    if all(len(rows) == 1 for rows in groups.values()):
        return None
    return [(key[0], rows) for key, rows in groups.items()]


def _pack_shared(input_ids: Tensor, attention_mask: Tensor, groups: list[tuple[int, list[int]]]) -> PackedBatch:
    """The packed row with one copy of each group's prompt, then each member's reply tokens;
    `attend` lets a token see its group's prompt and its own row's earlier tokens."""
    B, T = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    index = torch.zeros(B, T, dtype=torch.long)  # packed index of each real (b, t)
    ids, pos, group, member, cursor = [], [], [], [], 0
    for g, (p, rows) in enumerate(groups):
        for m, b in enumerate([rows[0], *rows]):  # m = 0: the shared prompt
            span = range(0, p) if m == 0 else range(p, lengths[b])
            ids.append(input_ids[b, span.start:span.stop])
            pos.append(torch.arange(span.start, span.stop))
            group.append(torch.full((len(span),), g))
            member.append(torch.full((len(span),), m))
            for row in (rows if m == 0 else [b]):
                index[row, span.start:span.stop] = torch.arange(cursor, cursor + len(span))
            cursor += len(span)
    pos_t, group_t, member_t = torch.cat(pos), torch.cat(group), torch.cat(member)
    attend = ((group_t[:, None] == group_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])
              & ((member_t[None, :] == 0) | (member_t[:, None] == member_t[None, :])))
    real = attention_mask.bool()
    pairs = real[:, :-1] & real[:, 1:]
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return PackedBatch(input_ids=torch.cat(ids)[None], position_ids=pos_t[None], cu_seqlens=cu,
                       max_len=max(lengths) if lengths else 0, pairs=pairs, source=index[:, :-1][pairs],
                       targets=input_ids[:, 1:][pairs], attend=attend)


def packed_hidden_state(backbone: PreTrainedModel, packed: PackedBatch) -> Tensor:
    """[1, M] packed ids -> [M, H]; no attention mask, so sequences are told apart by the
    position ids (sdpa/eager) or the cumulative lengths (varlen kernels); with shared prompts
    by the packed batch's 4D mask."""
    _maybe_use_varlen_attention(backbone, packed.input_ids.device)
    impl = getattr(backbone.config, "_attn_implementation", None)
    out = backbone(input_ids=packed.input_ids, use_cache=False, **packed.attention_kwargs(impl))
    return out.last_hidden_state[0]


def _maybe_use_varlen_attention(backbone: PreTrainedModel, device: torch.device) -> None:
    """On CUDA, swap sdpa/eager (a dense [M, M] block-diagonal mask) for varlen attention."""
    if device.type != "cuda" or getattr(backbone.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return
    from rlhf.kernels.varlen_attention import use_varlen_attention, varlen_unavailable_reason

    reason = varlen_unavailable_reason(device)
    if reason is None:
        use_varlen_attention(backbone)
    _log_attention_choice(reason)


@functools.cache
def _log_attention_choice(reason: str | None) -> None:
    if reason is None:
        _log.info("packed forwards: attention switched to rlhf_varlen (torch varlen flash kernel)")
    else:
        _log.warning("packed forwards: keeping sdpa with a dense block-diagonal mask (%s); install "
                     "flash-attn and load with attn_implementation='flash_attention_2' for varlen", reason)


def sequence_logprobs(
    model: PreTrainedModel,
    batch: SequenceBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    *,
    packing: bool | None = None,
    backend: str | None = None,
    positions: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of every target token under softmax(logits / temperature).

    batch.input_ids [B, T]. Returns logp [B, T-1] float32 (and entropy [B, T-1] when
    `with_entropy`); position t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).
    Padded: every position is computed; callers mask with batch.action_mask. Packed
    (`packing`, default: the model's `load_causal_lm(packing=...)`): positions whose target
    is padding are 0. Differentiable. `backend`: "auto" | "reference" | "triton" (default:
    $RLHF_LOGPROB_BACKEND or "auto"). Tied embeddings need nothing special:
    get_output_embeddings().weight is then the input embedding matrix itself.
    `positions` [B, T-1] bool (e.g. the action mask): only those positions go through the
    output head, the others are 0. The head is a large share of a real model's forward
    (SmolLM2: 28 M of 135 M parameters) and PPO needs it on the reply's tokens only.
    """
    packing = getattr(model, PACKING_ATTR, False) if packing is None else packing
    head = model.get_output_embeddings()
    logprobs = select_backend(backend or default_backend(), batch.input_ids.device)
    kw = dict(bias=head.bias, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    if not packing:
        hidden = last_hidden_state(backbone_of(model), batch.input_ids, batch.attention_mask)[:, :-1]
        targets = batch.input_ids[:, 1:]
        if positions is None:
            return logprobs(hidden, head.weight, targets, **kw)
        keep = positions.bool()
        out = logprobs(hidden[keep], head.weight, targets[keep], **kw)
        place = lambda x: x.new_zeros(keep.shape).masked_scatter(keep, x)  # noqa: E731
        return tuple(place(x) for x in out) if with_entropy else place(out)
    packed = pack_batch(batch.input_ids, batch.attention_mask, prompt_lengths(batch, positions))
    hidden = packed_hidden_state(backbone_of(model), packed)
    source, targets = packed.source, packed.targets
    keep = None if positions is None else positions.bool()[packed.pairs]
    if keep is not None:
        source, targets = source[keep], targets[keep]
    out = logprobs(hidden[source], head.weight, targets, **kw)

    def place(x: Tensor) -> Tensor:
        return packed.unpack(x if keep is None else x.new_zeros(keep.shape).masked_scatter(keep, x))

    return tuple(place(x) for x in out) if with_entropy else place(out)


class ValueModel(nn.Module):
    """Critic: causal-LM backbone + Linear(hidden, 1) value head.

    `values(batch)[b, t]` is V(state after token t), aligned with the [B, T-1] action layout.
    """

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None,
                 packing: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.packing = packing  # pack sequences in forward (see the module docstring)
        if value_head is None:
            value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
            # Zero init: the critic starts out predicting 0 everywhere, so the first value
            # targets are not fighting a random head (initialised from the policy).
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                        packing: bool = False) -> "ValueModel":
        """Backbone from a causal-LM (or backbone-only) folder; the value head from
        `<path>/value_head.safetensors` when the folder has one, else zero-initialised.

        Hook for the reward model: a reward model saved with `ValueModel.save_pretrained`
        (backbone + value_head.safetensors holding `weight` [1, H] and `bias` [1]) initialises
        the critic from the reward model, as InstructGPT does, with no change here.
        """
        dtype = resolve_dtype(dtype)
        # AutoModel on a *ForCausalLM folder loads the backbone and drops the LM head.
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype)
        model = cls(backbone, packing=packing)
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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_lens: Tensor | None = None) -> Tensor:
        """[B, T] -> values [B, T-1] float32 (the last position has no action, so it is cut;
        packed, positions whose next token is padding are 0; `prompt_lens`: shared prompts)."""
        if self.packing:
            packed = pack_batch(input_ids, attention_mask, prompt_lens)
            hidden = packed_hidden_state(self.backbone, packed)
            return packed.unpack(self.value_head(hidden[packed.source]).squeeze(-1).float())
        hidden = last_hidden_state(self.backbone, input_ids, attention_mask)
        return self.value_head(hidden[:, :-1]).squeeze(-1).float()

    def values(self, batch: SequenceBatch) -> Tensor:
        """batch [B, T] -> [B, T-1]: position t is V(input_ids[:, :t+1])."""
        return self(batch.input_ids, batch.attention_mask, prompt_lengths(batch))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)
