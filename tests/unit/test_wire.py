"""Tensors across Ray as numpy arrays (orchestrator/wire.py): same values, dtypes and shapes
back, writable, and everything numpy cannot carry falls back to torch's own pickling.

Run: .venv/bin/pytest tests/unit/test_wire.py -q   (no Ray cluster; Ray's pickler only)
"""
from __future__ import annotations

import pickle

import pytest
import torch
from ray import cloudpickle

from rlhf.orchestrator import experience, wire  # noqa: F401  (importing experience installs the reducer)

CASES = {
    "float32": torch.randn(4, 7),
    "int64": torch.randint(0, 1000, (3, 5)),
    "bool": torch.rand(6) > 0.5,
    "bfloat16": torch.randn(5, 3).to(torch.bfloat16),
    "float16": torch.randn(2, 2).half(),
    "float8": torch.randn(3, 4).to(torch.float8_e4m3fn),
    "0-dim": torch.tensor(2.5),
    "empty": torch.zeros(0, 4, dtype=torch.long),
    "column slice": torch.randn(4, 9)[:, 2:5],
    "transposed": torch.randn(3, 8).T,
    "row slice with offset": torch.arange(40.0).view(8, 5)[3:6],
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element width: equal bits, not just equal values."""
    return t.contiguous().view(wire._INT_OF_WIDTH[t.element_size()])


def _roundtrip(x, out_of_band: bool = False):
    if not out_of_band:
        return cloudpickle.loads(cloudpickle.dumps(x, protocol=5))
    # As Ray sends large arrays: buffers out of band, read-only on arrival (the object store's).
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(x, protocol=5, buffer_callback=buffers.append)
    tensors = [x] if isinstance(x, torch.Tensor) else [t for t in vars(x).values() if isinstance(t, torch.Tensor)]
    assert buffers or not any(t.numel() for t in tensors)  # the bytes did go out of band
    return pickle.loads(data, buffers=[memoryview(b).toreadonly() for b in buffers])


@pytest.mark.parametrize("out_of_band", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_plain_tensors_round_trip_as_numpy(name, out_of_band):
    x = CASES[name]
    assert wire.reduce_tensor(x)[0] is wire.rebuild_tensor  # the numpy route, not torch's saver
    y = _roundtrip(x, out_of_band)
    assert type(y) is torch.Tensor and y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(_bits(y), _bits(x))
    if y.numel():  # writable memory of its own: writing changes neither the sender's tensor nor a shared buffer
        before = x.clone()
        y.view(-1)[0] = y.view(-1)[1] if y.numel() > 1 else y.view(-1)[0]
        y.zero_()
        assert torch.equal(x, before)


def test_what_numpy_cannot_carry_falls_back_to_torch_pickling():
    param = torch.nn.Parameter(torch.randn(3, 2))
    grad = torch.randn(4, requires_grad=True)
    sparse = torch.eye(3).to_sparse()
    for x in (grad, sparse):
        assert wire.reduce_tensor(x)[0] is not wire.rebuild_tensor
    y = _roundtrip(param)
    assert isinstance(y, torch.nn.Parameter) and torch.equal(y.detach(), param.detach())
    y = _roundtrip(grad)
    assert y.requires_grad and torch.equal(y.detach(), grad.detach())
    assert torch.equal(_roundtrip(sparse).to_dense(), torch.eye(3))


def test_a_slice_travels_without_the_rest_of_its_storage():
    big = torch.randn(1000, 64)
    rows = big[10:12]
    assert len(cloudpickle.dumps(rows, protocol=5)) < 2 * 64 * 4 + 1024  # two rows and a header
    assert torch.equal(_roundtrip(rows), rows)


def test_a_batch_crosses_with_its_tensors_intact():
    batch = experience.SequenceBatch(torch.randint(0, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long),
                                     torch.zeros(3, 5, dtype=torch.long))
    back = _roundtrip(batch, out_of_band=True)
    for a, b in zip(vars(batch).values(), vars(back).values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.dtype == b.dtype


def test_a_role_s_mini_batch_carries_only_the_fields_it_reads():
    seq = experience.SequenceBatch(torch.randint(0, 50, (4, 9)), torch.ones(4, 9, dtype=torch.long),
                                   torch.ones(4, 8))
    seq.attention_mask[:, 7:] = 0  # two padding columns for trimmed() to drop
    full = experience.Experience(seq, *(torch.randn(4, 8) for _ in range(5)))
    policy = full.keeping("old_logp", "advantages")
    assert (policy.ref_logp, policy.returns, policy.old_values) == (None, None, None)
    assert policy.sequences is full.sequences and policy.advantages is full.advantages
    part = policy.select(torch.tensor([2, 0])).trimmed().split(2)[1]  # what a rank of the policy gets
    assert part.ref_logp is None and part.returns is None and part.old_values is None
    assert torch.equal(part.old_logp, full.old_logp[0:1, :6]) and torch.equal(part.advantages, full.advantages[0:1, :6])
    back = _roundtrip(part)
    assert back.returns is None and torch.equal(back.advantages, part.advantages)
    # Three of the five [B, T-1] float tensors stay behind: well under the whole batch's bytes.
    assert len(cloudpickle.dumps(policy, protocol=5)) < len(cloudpickle.dumps(full, protocol=5)) - 3 * 4 * 8 * 4


def test_inline_slices_leave_out_what_a_role_does_not_read_and_stored_ones_stay_shared(monkeypatch):
    from rlhf.orchestrator.ppo import groups

    stored = []
    monkeypatch.setattr(groups.ray, "put", lambda part: stored.append(part) or f"ref{len(stored)}")
    small = experience.SequenceBatch(torch.randint(0, 50, (4, 9)), torch.ones(4, 9, dtype=torch.long),
                                     torch.ones(4, 8))
    scattered = groups.Scattered(experience.Experience(small, *(torch.randn(4, 8) for _ in range(5))))
    critic = scattered.parts(2, ("old_values", "returns"))
    assert [p.old_logp for p in critic] == [None, None] and torch.equal(critic[1].returns, scattered.batch.returns[2:])
    assert all(p.advantages is not None for p in scattered.parts(2))  # the shared slices keep every field
    rows = groups.INLINE_BYTES // (8 * 4)  # float32 rows of 8: each of the 5 token tensors alone is inline-sized
    big = experience.SequenceBatch(torch.zeros(rows, 9, dtype=torch.long), torch.ones(rows, 9, dtype=torch.long),
                                   torch.ones(rows, 8))
    scattered = groups.Scattered(experience.Experience(big, *(torch.zeros(rows, 8) for _ in range(5))))
    policy, critic = scattered.parts(1, ("old_logp", "advantages")), scattered.parts(1, ("old_values", "returns"))
    assert policy == critic == ["ref1"] and len(stored) == 1  # put once, whole, for both roles
