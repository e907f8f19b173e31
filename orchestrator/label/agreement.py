"""How much two labelers agree on one comparison: two rank lists over the same K replies
(0 = best, equal ranks = tie).

- `pairwise_agreement`: the share of the C(K, 2) reply pairs on which both say the same
  thing (i better, j better, or tie). 1 = identical orderings.
- `kendall_tau_b`: Kendall's tau-b, (C - D) / sqrt((n0 - n1)(n0 - n2)), with C and D the
  concordant and discordant pairs, n0 = C(K, 2) and n1, n2 the pairs each labeler tied.
  In [-1, 1]; None when either labeler tied every pair (it is undefined then).
"""
from __future__ import annotations

import math
from itertools import combinations


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(a: list[int], b: list[int]) -> float:
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"two rankings of the same >= 2 replies, got {len(a)} and {len(b)} ranks")
    pairs = list(combinations(range(len(a)), 2))
    return sum(_sign(a[i] - a[j]) == _sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def kendall_tau_b(a: list[int], b: list[int]) -> float | None:
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"two rankings of the same >= 2 replies, got {len(a)} and {len(b)} ranks")
    pairs = list(combinations(range(len(a)), 2))
    products = [_sign(a[i] - a[j]) * _sign(b[i] - b[j]) for i, j in pairs]
    n0 = len(pairs)
    n1 = sum(a[i] == a[j] for i, j in pairs)
    n2 = sum(b[i] == b[j] for i, j in pairs)
    if n1 == n0 or n2 == n0:
        return None
    return (products.count(1) - products.count(-1)) / math.sqrt((n0 - n1) * (n0 - n2))
