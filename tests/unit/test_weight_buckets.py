"""Weight buckets: grouping, both encodings round-trip, and a gloo WeightGroup broadcast."""
from __future__ import annotations

import multiprocessing as mp
import socket

import torch

from rlhf.actors.weights import (BucketMeta, WeightGroup, bucket_from_bytes, bucket_to_bytes, flatten_bucket,
                                 iter_buckets, unflatten_bucket)


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(4, 4, generator=g)),                     # 64 bytes
            ("b", torch.randn(8, generator=g).to(torch.bfloat16)),     # 16 bytes
            ("c", torch.arange(6, dtype=torch.int64).view(2, 3)),      # 48 bytes
            ("d", torch.randn(40, generator=g))]                        # 160 bytes, over the cap alone


def test_buckets_respect_the_size_cap_and_keep_order():
    buckets = list(iter_buckets(_named(), bucket_bytes=100))
    # a(64)+b(16)=80 <= 100; +c(48) would be 128 -> new bucket; c+d = 208 -> d alone.
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]


def test_bytes_and_flat_encodings_round_trip_exactly():
    named = _named()
    for name, t in bucket_from_bytes(bucket_to_bytes(named)):
        assert torch.equal(t, dict(named)[name]) and t.dtype == dict(named)[name].dtype
    flat, meta = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() == meta.total_bytes == 64 + 16 + 48 + 160
    meta = BucketMeta.from_dict(meta.to_dict())  # as it crosses an RPC
    for (name, t), (name2, t2) in zip(named, unflatten_bucket(flat, meta)):
        assert name == name2 and t.dtype == t2.dtype and torch.equal(t, t2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver(port, meta_dict, queue):
    group = WeightGroup("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=60)
    meta = BucketMeta.from_dict(meta_dict)
    flat = torch.empty(meta.total_bytes, dtype=torch.uint8)
    group.broadcast(flat, src=0)
    queue.put({n: t.clone() for n, t in unflatten_bucket(flat, meta)})


def test_gloo_weight_group_broadcasts_a_bucket_to_another_process():
    named = _named()
    flat, meta = flatten_bucket(named)
    port = _free_port()
    ctx = mp.get_context("fork")  # a spawned child could not import this test module
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, meta.to_dict(), queue))
    proc.start()
    sender = WeightGroup("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=60)
    sender.broadcast(flat, src=0)
    got = queue.get(timeout=60)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    for name, t in named:
        assert torch.equal(got[name], t)
