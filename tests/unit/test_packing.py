"""Packed learner/reference forwards (rlhf.actors.modeling, packing=True) equal padded ones.

A tiny random Qwen2 (built in memory), sequences of different lengths, float32: log-probs,
entropies and values must match the padded forward within 1e-5 at every position whose
target is a real token (parameter gradients within 1e-5 of each tensor's largest entry:
float32 summation order, see _assert_grads_close), and be 0 at the others; in float64
everything agrees to 1e-10. A control shows the comparison would catch attention leaking
across packed sequences.

Run: .venv/bin/pytest tests/unit/test_packing.py -q   (the CUDA test skips without a GPU)
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from rlhf.actors.modeling import PACKING_ATTR, ValueModel, pack_batch, prompt_lengths, sequence_logprobs
from rlhf.orchestrator.experience import SequenceBatch

ATOL = 1e-5
LENGTHS = [7, 1, 12, 3, 12, 5]  # unequal, one single-token row, two of the maximum length
VOCAB = 97


def _config(attn: str) -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024, attn_implementation=attn)


def _batch(lengths=LENGTHS, seed=0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return SequenceBatch(ids * mask, mask, mask[:, 1:])  # right padding with pad id 0


def _policy(attn: str, scale: float = 8.0) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(attn))
    # Larger-than-init weights make tokens attend to each other noticeably, so leakage
    # across packed sequences would show (see the control test).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_pack_batch_by_hand():
    ids = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    p = pack_batch(ids, mask)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6] and p.max_len == 3
    assert p.pairs.tolist() == [[True, True], [False, False], [True, False]]
    assert p.source.tolist() == [0, 1, 4] and p.targets.tolist() == [6, 7, 4]
    assert p.unpack(torch.tensor([1.0, 2.0, 3.0])).tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_entropy_and_grads_equal_padded(attn):
    pairs, (lp0, ent0, g0), (lp1, ent1, g1) = _padded_and_packed(_policy(attn), _batch())
    torch.testing.assert_close(lp1[pairs], lp0[pairs], atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1[pairs], ent0[pairs], atol=ATOL, rtol=0)
    assert not lp1[~pairs].any() and not ent1[~pairs].any()
    assert g0.keys() == g1.keys() and len(g0) > 10
    _assert_grads_close(g1, g0)


def _padded_and_packed(model, batch):
    """(pairs, padded results, packed results): log-probs, entropies and the gradients of a
    random weighting of both over real targets only (what PPO's masked losses see)."""
    pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = (torch.randn(pairs.shape, generator=g, dtype=dtype) for _ in range(2))
    results = {}
    for packing in (False, True):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, batch, 0.7, chunk_size=16, with_entropy=True, packing=packing)
        ((logp * w_lp + ent * w_ent) * pairs).sum().backward()
        results[packing] = (logp.detach(), ent.detach(), _grads(model))
    return pairs, results[False], results[True]


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """float32 gradients agree to ATOL relative to each tensor's largest entry.

    Why not ATOL absolute: an entry's float32 rounding error scales with the terms summed
    into it, not with the entry. Measured on this model (eager): the embedding gradient
    reaches |g| = 30.9, and the PADDED forward itself is off the float64 result by up to
    3.7e-5 (191 of 6208 entries beyond 1e-5), the packed one by 3.7e-5; entry (54, 44) is
    0.0075485 padded, 0.0075618 packed, 0.0075567 in float64. In float64 the two agree to
    4e-15 (test_packed_grads_equal_padded_float64), so the float32 gap is summation order.
    The largest float32 error over all tensors is 2.5e-6 x the tensor's max |g|."""
    for name in want:
        scale = max(float(want[name].abs().max()), 1.0)
        torch.testing.assert_close(got[name], want[name], atol=ATOL * scale, rtol=1e-4, msg=name)


def test_packed_grads_equal_padded_float64():
    # Packing is exact up to rounding: in float64 log-probs, entropies and every gradient
    # agree to 1e-10. sdpa only: transformers' eager attention casts its softmax to float32.
    pairs, (lp0, ent0, g0), (lp1, ent1, g1) = _padded_and_packed(_policy("sdpa").double(), _batch())
    assert lp0.dtype == torch.float64 and len(g0) > 10
    torch.testing.assert_close(lp1[pairs], lp0[pairs], atol=1e-10, rtol=0)
    torch.testing.assert_close(ent1[pairs], ent0[pairs], atol=1e-10, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-10, rtol=0, msg=name)


def test_model_attribute_selects_packing():
    model, batch = _policy("sdpa"), _batch()
    pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
    setattr(model, PACKING_ATTR, True)
    with torch.no_grad():
        packed = sequence_logprobs(model, batch)
    assert not packed[~pairs].any()  # zeros at padding targets: the packed path ran


def test_packed_values_and_grads_equal_padded():
    torch.manual_seed(0)
    backbone = Qwen2Model(_config("sdpa"))
    critic = ValueModel(backbone)
    torch.nn.init.normal_(critic.value_head.weight)  # the zero init would hide the backbone
    batch = _batch(seed=3)
    pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
    w = torch.randn(pairs.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for packing in (False, True):
        critic.packing = packing
        critic.zero_grad()
        values = critic.values(batch)
        ((values * w) * pairs).sum().backward()
        results[packing] = (values.detach(), _grads(critic))
    (v0, g0), (v1, g1) = results[False], results[True]
    torch.testing.assert_close(v1[pairs], v0[pairs], atol=ATOL, rtol=0)
    assert not v1[~pairs].any()
    _assert_grads_close(g1, g0)


def test_control_leakage_across_sequences_would_be_caught():
    # Same packed row, but positions 0..M-1 (no restarts): transformers then sees one long
    # sequence and lets later sequences attend to earlier ones. The comparison above must
    # be able to tell: the log-probs move by far more than its tolerance.
    model, batch = _policy("sdpa"), _batch()
    p = pack_batch(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        good = sequence_logprobs(model, batch, packing=True)
        hidden = model.model(input_ids=p.input_ids, position_ids=torch.arange(p.input_ids.shape[1])[None],
                             use_cache=False).last_hidden_state[0]
        head = model.get_output_embeddings()
        leaky = p.unpack(torch.log_softmax(head(hidden[p.source]), -1).gather(1, p.targets[:, None])[:, 0])
    first = torch.zeros_like(p.pairs)
    first[0] = True  # the first sequence has nothing before it: identical either way
    torch.testing.assert_close(leaky[first & p.pairs], good[first & p.pairs], atol=ATOL, rtol=0)
    assert (leaky - good)[p.pairs & ~first].abs().max() > 100 * ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_equals_padded_cuda_bf16():
    """On CUDA a packed forward switches sdpa to rlhf_varlen (torch's varlen flash kernel),
    which needs bf16/fp16. Ground truth: the padded fp32 forward. The packed bf16 result
    must be as close to it as the padded bf16 one (leakage across sequences would not be)."""
    model = _policy("sdpa", scale=2.0).to("cuda")
    batch = _batch([300, 17, 512, 64, 512, 1, 200])
    batch = SequenceBatch(*(t.cuda() for t in (batch.input_ids, batch.attention_mask, batch.action_mask)))
    pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
    with torch.no_grad():
        truth = sequence_logprobs(model, batch, packing=False)
        model.to(torch.bfloat16)
        padded = sequence_logprobs(model, batch, packing=False)
        packed = sequence_logprobs(model, batch, packing=True)
    assert model.config._attn_implementation == "rlhf_varlen"
    err_padded = (padded - truth)[pairs].abs().max().item()
    err_packed = (packed - truth)[pairs].abs().max().item()
    assert err_packed <= 3 * err_padded + 1e-3, (err_packed, err_padded)
    assert not packed[~pairs].any()


def _per_sequence_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False, **_):
    """Stand-in for torch's CUDA varlen kernel: causal sdpa on each [cu[i], cu[i+1]) span."""
    assert window_size == (-1, 0), "the adapter must ask for causal attention"
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qq, kk, vv = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outs)


def test_varlen_adapter_with_a_reference_kernel(monkeypatch):
    # The rlhf_varlen adapter (layouts, GQA, causal flag, kwargs plumbing) on CPU, with the
    # CUDA kernel replaced by per-sequence sdpa of the same signature.
    import inspect

    from rlhf.kernels import varlen_attention as va

    _per_sequence_varlen.__signature__ = inspect.signature(
        lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False: None)
    monkeypatch.setattr(va, "_varlen_fn", lambda: _per_sequence_varlen)
    va._call_kwargs.cache_clear()
    try:
        model, batch = _policy("sdpa"), _batch()
        with torch.no_grad():
            want = sequence_logprobs(model, batch, packing=False)
            va.use_varlen_attention(model)
            got = sequence_logprobs(model, batch, packing=True)
            pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
            torch.testing.assert_close(got[pairs], want[pairs], atol=ATOL, rtol=0)
            with pytest.raises(RuntimeError, match="packed batches only"):
                sequence_logprobs(model, batch, packing=False)
    finally:
        va._call_kwargs.cache_clear()


def test_reference_model_packing_kwarg(tmp_path):
    # The reference actor's constructor kwarg reaches its forward: same log-probs (it
    # zeroes positions outside action_mask either way).
    from rlhf.actors.reference import ReferenceModel

    _policy("sdpa").save_pretrained(tmp_path / "m")
    batch = _batch()
    threads = torch.get_num_threads()  # the actor sets its own; give the test process its back
    try:
        padded = ReferenceModel(str(tmp_path / "m"), micro_batch_size=4).compute_logprobs(batch, 0.7)
        ref = ReferenceModel(str(tmp_path / "m"), micro_batch_size=4, packing=True)
        assert getattr(ref.model, PACKING_ATTR) is True
        torch.testing.assert_close(ref.compute_logprobs(batch, 0.7), padded, atol=ATOL, rtol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("packing", [False, True])
def test_positions_put_only_the_replies_through_the_head(packing):
    """`positions` (the action mask): the same log-probs, entropies and gradients there as the
    full computation, 0 elsewhere, padded or packed."""
    model, batch = _policy("sdpa"), _batch()
    g = torch.Generator().manual_seed(2)
    positions = (torch.rand(batch.action_mask.shape, generator=g) < 0.5) & batch.action_mask.bool()
    w = torch.randn(positions.shape, generator=g)
    results = []
    for pos in (None, positions):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, batch, 0.7, chunk_size=16, with_entropy=True, packing=packing,
                                      positions=pos)
        ((logp + ent) * w * positions).sum().backward()
        results.append((logp.detach(), ent.detach(), _grads(model)))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1[positions], lp0[positions], atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1[positions], ent0[positions], atol=ATOL, rtol=0)
    assert not lp1[~positions].any() and not ent1[~positions].any() and lp0[~positions & batch.action_mask.bool()].any()
    _assert_grads_close(g1, g0)


def _shared_prompt_batch(seed=5) -> tuple[SequenceBatch, int]:
    """Three prompts (lengths 6, 3, 9) with 3, 2 and 1 replies of unequal lengths, rows of one
    prompt not adjacent, right-padded; action mask on the reply targets. Also returns the
    token count of the shared packed row (each prompt once, then every reply)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (6, 3, 9)]
    rows = [(0, 4), (1, 1), (0, 7), (2, 3), (0, 2), (1, 5)]  # (prompt, reply length)
    T = max(len(prompts[p]) + r for p, r in rows)
    ids, mask, acts = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    for b, (p, r) in enumerate(rows):
        n = len(prompts[p])
        ids[b, :n], ids[b, n:n + r] = prompts[p], torch.randint(1, VOCAB, (r,), generator=g)
        mask[b, :n + r] = 1
        acts[b, n - 1:n + r - 1] = 1
    return SequenceBatch(ids, mask, acts[:, :-1].float()), sum(len(p) for p in prompts) + sum(r for _, r in rows)


def test_shared_prompts_pack_each_prompt_once():
    batch, packed_tokens = _shared_prompt_batch()
    p = pack_batch(batch.input_ids, batch.attention_mask, prompt_lengths(batch))
    assert prompt_lengths(batch).tolist() == [6, 3, 6, 9, 6, 3]
    assert p.input_ids.shape[1] == packed_tokens < int(batch.attention_mask.sum())
    assert p.attend is not None and p.attend.shape == (packed_tokens, packed_tokens)
    # every pair's source token is the same token id as in the padded row
    b, t = p.pairs.nonzero().unbind(1)
    assert torch.equal(p.input_ids[0, p.source], batch.input_ids[b, t])
    # no two rows share a prompt: the plain layout
    single = SequenceBatch(batch.input_ids[[0, 1, 3]], batch.attention_mask[[0, 1, 3]], batch.action_mask[[0, 1, 3]])
    assert pack_batch(single.input_ids, single.attention_mask, prompt_lengths(single)).attend is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_logprobs_entropy_and_grads_equal_padded(attn):
    batch, _ = _shared_prompt_batch()
    pairs, (lp0, ent0, g0), (lp1, ent1, g1) = _padded_and_packed(_policy(attn), batch)
    torch.testing.assert_close(lp1[pairs], lp0[pairs], atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1[pairs], ent0[pairs], atol=ATOL, rtol=0)
    _assert_grads_close(g1, g0)


def test_shared_prompt_logprobs_equal_padded_float64():
    # The forward is exact: a shared prompt's hidden states are the same function of the same
    # tokens. The gradients agree to float32 rounding only, even in float64: Qwen2's RMSNorm
    # computes in float32, and a shared prompt token's backward normalises the SUM of its
    # replies' gradients once instead of each part (measured: 1.4e-5 of |g| up to 44).
    batch, _ = _shared_prompt_batch()
    pairs, (lp0, ent0, g0), (lp1, ent1, g1) = _padded_and_packed(_policy("sdpa").double(), batch)
    torch.testing.assert_close(lp1[pairs], lp0[pairs], atol=1e-10, rtol=0)
    torch.testing.assert_close(ent1[pairs], ent0[pairs], atol=1e-10, rtol=0)
    for name in g0:
        scale = max(float(g0[name].abs().max()), 1.0)
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6 * scale, rtol=0, msg=name)


def test_shared_prompt_values_equal_padded():
    torch.manual_seed(0)
    critic = ValueModel(Qwen2Model(_config("sdpa")))
    torch.nn.init.normal_(critic.value_head.weight)
    batch, _ = _shared_prompt_batch(seed=6)
    pairs = pack_batch(batch.input_ids, batch.attention_mask).pairs
    got = {}
    for packing in (False, True):
        critic.packing = packing
        got[packing] = critic.values(batch).detach()
    torch.testing.assert_close(got[True][pairs], got[False][pairs], atol=ATOL, rtol=0)


def test_control_replies_seeing_each_other_would_be_caught():
    # The shared row with a mask that lets a reply also see the other replies of its prompt:
    # the log-probs after the first reply move by far more than the tolerance.
    model, (batch, _) = _policy("sdpa"), _shared_prompt_batch()
    p = pack_batch(batch.input_ids, batch.attention_mask, prompt_lengths(batch))
    index = torch.arange(p.input_ids.shape[1])
    with torch.no_grad():
        good = sequence_logprobs(model, batch, packing=True)
        # tokens of one prompt group: connected through the attend mask (its prompt is shared)
        group = p.attend.clone()
        for _ in range(3):
            group = group | ((group.float() @ group.float()) > 0) | group.T
        leaky_mask = group & (index[None, :] <= index[:, None])  # every earlier token of the group
        hidden = model.model(input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=leaky_mask[None, None],
                             use_cache=False).last_hidden_state[0]
        head = model.get_output_embeddings()
        leaky = p.unpack(torch.log_softmax(head(hidden[p.source]), -1).gather(1, p.targets[:, None])[:, 0])
    assert (leaky - good)[p.pairs].abs().max() > 100 * ATOL
