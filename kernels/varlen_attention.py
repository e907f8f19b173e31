"""Attention over packed sequences for Hugging Face models on CUDA, without flash-attn.

Packed learner batches (rlhf.actors.modeling, `packing`) put a micro-batch's sequences
back to back in one row, with position ids restarting per sequence. Hugging Face's
`sdpa`/`eager` attention then builds a dense block-diagonal [M, M] mask (correct, but
attention costs M^2 for M packed tokens instead of sum L_i^2); `flash_attention_2`
runs the varlen kernel instead, but needs the flash-attn package. PyTorch ships the same
kernel as `torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.10). This module
registers it with transformers under the name ``rlhf_varlen``:

    use_varlen_attention(model)   # CUDA: packed forwards then cost sum L_i^2

The function reads the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments that
transformers forwards to every attention call (modeling.py passes them with packed
inputs), and the mask builder registered with it returns no mask at all (like flash's).
It serves packed forwards only: it raises on a padded batch. CPU machines never use it
(sdpa's block-diagonal mask is what they get); its test is GPU-marked.
"""
from __future__ import annotations

import functools
import inspect

import torch

NAME = "rlhf_varlen"


@functools.cache
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_unavailable_reason(device: torch.device) -> str | None:
    """None if `rlhf_varlen` attention can run on `device`, else why not."""
    if device.type != "cuda":
        return f"varlen attention needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _varlen_fn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "varlen attention (FlashAttention-2 kernels) needs compute capability >= 8.0"
    return None


@functools.cache
def _call_kwargs() -> tuple[dict, bool]:
    """Causal flag for this torch's signature (2.10: is_causal; later: window_size), and
    whether it takes grouped-query K/V directly (enable_gqa)."""
    params = inspect.signature(_varlen_fn()).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention interface: query [1, Hq, M, D], key/value [1, Hkv, M, D]
    -> ([1, M, Hq, D], None)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RuntimeError(f"{NAME} attention serves packed batches only (one row and cu_seq_lens_q); "
                           "turn packing on, or load the model with attn_implementation='sdpa'")
    if dropout or sliding_window:
        raise NotImplementedError(f"{NAME} attention: attention dropout and sliding windows are not supported")
    causal, takes_gqa = _call_kwargs()
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [M, heads, D]
    if k.shape[1] != q.shape[1]:
        if takes_gqa:
            causal = {**causal, "enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = _varlen_fn()(q, k, v, cu_seq_lens_q, cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
                       int(max_length_q), int(max_length_k or max_length_q), scale=scaling, **causal)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    # Sequence boundaries come from cu_seq_lens, as with flash-attention: no [M, M] mask.
    return None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)


def use_varlen_attention(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to `rlhf_varlen` attention."""
    _register()
    model.set_attn_implementation(NAME)
